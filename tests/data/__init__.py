"""Data (sessa_scale/data, data_prep/): the dataset format, the loader, `sessa-scale prep`."""
