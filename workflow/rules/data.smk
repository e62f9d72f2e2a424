# Real images: rendering or import, then the FID feature statistics of each split.


rule prepare_data:
    # Writes data/train/ and data/val/ in one job (the split is a seeded shuffle of one
    # source); text sources also write text.jsonl with the ground-truth text.
    output:
        data_files("train"),
        data_files("val"),
    params:
        config=exp_file,
        out=f"{RESULTS}/data",
        # data.workers changes how fast, never what is written
        cfg_hash=hash_of(lambda c, w: {"data": {k: v for k, v in c["data"].items() if k != "workers"},
                                       "seed": c["seed"]}),
    log:
        log_path("prepare_data"),
    benchmark:
        benchmark_path("prepare_data")
    threads: lambda w: exp_cfg(w)["data"]["workers"] + 1  # the job's process + its decoding workers
    resources:
        **DATA_JOB,
    shell:
        "DND_RULE={rule} OMP_NUM_THREADS={threads} {PYTHON} -m dnd prepare_data --config {params.config} --out {params.out}"
        " > {log} 2>&1"


rule reference_stats:
    # Inception features of the real images, computed once and reused by every FID:
    # train for generated samples (gFID), val for reconstructions (rFID).
    input:
        f"{RESULTS}/data/{{split}}/images.npy",
        f"{RESULTS}/data/{{split}}/manifest.json",
    output:
        f"{RESULTS}/data/{{split}}/fid_features.npz",
    params:
        config=exp_file,
        split_dir=f"{RESULTS}/data/{{split}}",
        cfg_hash=hash_of(lambda c, w: {"fid": c["evaluate"]["fid"]}),
    log:
        log_path("reference_stats", "{split}"),
    benchmark:
        benchmark_path("reference_stats", "{split}")
    threads: res_threads
    resources:
        **MODEL_JOB,
    shell:
        "DND_RULE={rule} OMP_NUM_THREADS={threads} {PYTHON} -m dnd reference_stats --config {params.config}"
        " --split-dir {params.split_dir} --out {output} > {log} 2>&1"
