"""Generation: the one sampling loop (sampling.py: settings, the draw, Decoding, decode_many), the
single-prompt Generator over it (generator.py: Generator, sample), and continuous batching of many
requests in one batch (batching.py), both over the LSTM's Stepper; a request's Job, its event
queue and the Scheduler that steps the engines (jobs.py); priming from a document (priming.py)."""
