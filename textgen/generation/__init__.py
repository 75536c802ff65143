"""Generation: the one sampling loop (sampling.py: Decoding, Generator, sample) and continuous batching
of many requests in one batch (batching.py), both over the LSTM's Stepper; a request's Job, its event
queue and the Scheduler that steps the engines (jobs.py); priming from a document (priming.py)."""
