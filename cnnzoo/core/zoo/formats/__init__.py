"""One reader per zoo file format, each ``read(path) -> dict[str, np.ndarray]`` in the file's
own order, each with only numpy (and h5py for HDF5) underneath: no zoo framework is imported,
and nothing in a file can run code."""
