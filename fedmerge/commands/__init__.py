"""The experiment commands of the ``fedmerge`` command-line tool (runner layer): ``connectivity``,
``merge-experiment`` (:mod:`.experiments`) and ``analyse`` (:mod:`.analyse`). Each module adds
its subcommands with ``add_parsers(sub)`` and imports no torch until a command runs."""
