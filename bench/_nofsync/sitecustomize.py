"""The no-fsync side of ``bench/scale.py --fsync-rounds`` only: put this folder on PYTHONPATH and siftlens.io
writes atomically as it did before fsync (issue 22 item 11), so the cost of durability can be measured."""

import siftlens.io as _io

_io.fsync_file = _io.fsync_dir = lambda *_a: None
