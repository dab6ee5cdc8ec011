"""Training: one loop for both stages, the stage objects (teacher, distill), and the run around them: its folder, context, logger, optimizers, plan and in-training evaluation."""
