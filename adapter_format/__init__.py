"""The adapter artifact contract, in one place for the trainer (which writes artifacts) and
the server (which reads them): the manifest and its atomic writes (`manifest`), and the
bottleneck adapter's file format and formula (`bottleneck`). PEFT formats are PEFT's own."""
