"""A run's files and its safety: checkpoint I/O (:mod:`.checkpoint_io`), the run's last and
previous checkpoints (:mod:`.last`), exact resumption (:mod:`.resume`) and the SIGTERM
agreement under DDP (:mod:`.sigterm`). Import the submodule you need: ``checkpoint_io`` loads
without Lightning."""
