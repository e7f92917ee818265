"""The pytest suite, one folder per concern (mirroring sessa_scale/): ops, models, config, data, training,
distributed, launch, evaluation, bench; helpers/ holds what tests of several folders share. A package, so
that every test module and helper is imported by its full name (tests.ops.test_ssd, tests.helpers...)
with the repository root on sys.path, and no test edits sys.path."""
