"""Label-free repair of a shortcut by retraining (``siftlens repair``): ``head`` fits a new head on features
with the flagged tokens dropped over a re-weighted set (:func:`~siftlens.shortcuts.retraining.head.repair`,
:class:`~siftlens.shortcuts.retraining.head.RepairConfig`); ``blocks`` fine-tunes the last blocks too."""
