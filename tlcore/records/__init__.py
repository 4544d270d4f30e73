"""What a run and a dataset leave behind: the data home, atomic writes, the typed run records,
the recipe (`config`), the run folder's layout and the SQLite store. Every other band reads and
writes through these; they import nothing of the engine but `tlcore.errors`."""
