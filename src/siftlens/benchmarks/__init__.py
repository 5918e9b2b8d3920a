"""Benchmark datasets with known shortcuts, and their evaluations.

``spurious_cifar``: SpuriousCIFAR, CIFAR-10 with a class-correlated marker glyph planted in each image (the
builder behind ``siftlens make-spurious``, the glyphs and the ``markers.json`` sidecars);
``spurious_cifar_eval``: a discovery scored against those sidecars (the rank of each class's own marker).
"""
