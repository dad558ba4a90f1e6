"""Training: the loop and everything it writes and reads back.

  step        the train step and the evaluation step, and the state they act on
  optimizer   AdamW / Adam x5 for tables / no-decay groups, schedules, clipping
  loop        `train(config)`: set-up, the loop, its hooks
  evaluation  validation loss, perplexity and bits per byte
  metrics     metrics pulled from the device, written, plotted
  signals     SIGTERM and the tests' fault injection
  checkpoint  Orbax checkpoints with fall-back past unreadable ones
  run_dir     a run directory's layout, and loading a trained model from one
"""
