"""What every job needs, whatever it computes: the structured-config machinery and the one registry of
config variants, run directories, locks and signals, atomic writes, secret scrubbing, threads and seeds."""
