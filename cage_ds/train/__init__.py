"""cage-train: config, data, model, loop and CLI of the CAGE QAT application (DeepSpeed)."""
