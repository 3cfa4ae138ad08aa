"""Coverage-guided fuzzing of every jasper reader with atheris (libFuzzer for Python).

``python -m reliability.fuzz --seconds N`` runs each target of
:mod:`reliability.fuzz.target` for N seconds in its own process; an input that makes a reader
raise anything but a :class:`jasper.errors.JasperError`, crash or hang is a finding: libFuzzer
stops, the input is saved (``--artifacts``), and the exit status is nonzero.
"""

#: the fuzz targets, one per reader
TARGETS = ("manifest", "pt", "hdf5", "memmap", "zarr", "chroma")
