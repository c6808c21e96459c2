"""The training loop's library: the Trainer as loraflow builds it, its callback, checkpoints, and jobs of
several processes.

    trainer = trainer.build_trainer(cfg, model, tokenizer, prepared, output_dir, callback)
    run_id, checkpoint = checkpoints.find_resumable_run(cfg, store, run_id=None)
    ranks = distributed.Ranks(rank, world_size, device)

The train stage (`loraflow.stages.train`) runs one training run with these.
"""
