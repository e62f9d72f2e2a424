# RQ-VAE tokenizers: training, reconstruction of the val split, and code extraction.


rule train_tokenizer:
    # resume.pt (written beside model.pt) is deliberately not an output: Snakemake
    # removes outputs before a job starts, and a killed job must be able to resume.
    input:
        data_files("train"),
    output:
        model=f"{RESULTS}/tokenizer/{{tok}}/model.pt",
        log_csv=f"{RESULTS}/tokenizer/{{tok}}/train_log.csv",
    params:
        config=exp_file,
        data=f"{RESULTS}/data/train",
        cfg_hash=hash_of(lambda c, w: {"tokenizer": c["tokenizers"][w.tok], "seed": c["seed"]}),
    log:
        log_path("train_tokenizer", "{tok}"),
    benchmark:
        benchmark_path("train_tokenizer", "{tok}")
    threads: res_threads
    resources:
        **TRAIN_JOB,
    shell:
        "DND_RULE={rule} OMP_NUM_THREADS={threads} {PYTHON} -m dnd train_tokenizer --config {params.config} --tokenizer {wildcards.tok}"
        " --data {params.data} --out {output.model} --processes {resources.gpu} > {log} 2>&1"


rule reconstruct:
    # The reconstructions are only an input to the tokenizer metrics: temp() (the
    # ImageNet val split is ~10 GB of uint8).
    input:
        data_files("val"),
        model=rules.train_tokenizer.output.model,
    output:
        recon=temp(f"{RESULTS}/tokenizer/{{tok}}/recon/recon.npy"),
        metrics=f"{RESULTS}/tokenizer/{{tok}}/recon/recon_metrics.json",
    params:
        config=exp_file,
        data=f"{RESULTS}/data/val",
        out=f"{RESULTS}/tokenizer/{{tok}}/recon",
    log:
        log_path("reconstruct", "{tok}"),
    benchmark:
        benchmark_path("reconstruct", "{tok}")
    threads: res_threads
    resources:
        **MODEL_JOB,
    shell:
        "DND_RULE={rule} OMP_NUM_THREADS={threads} {PYTHON} -m dnd reconstruct --config {params.config} --tokenizer {wildcards.tok}"
        " --model {input.model} --data {params.data} --out {params.out} > {log} 2>&1"


rule extract_codes:
    # Train codes feed the generators (ten-crop views when extract.ten_crop); val codes, one
    # plain view per image, give the generators' held-out loss (rule heldout_loss).
    input:
        lambda w: data_files(w.split),
        model=rules.train_tokenizer.output.model,
    output:
        codes=f"{RESULTS}/codes/{{tok}}/{{split}}/codes.npy",
        labels=f"{RESULTS}/codes/{{tok}}/{{split}}/labels.npy",
        manifest=f"{RESULTS}/codes/{{tok}}/{{split}}/manifest.json",
    params:
        config=exp_file,
        data=f"{RESULTS}/data/{{split}}",
        out=f"{RESULTS}/codes/{{tok}}/{{split}}",
        views=lambda w: "" if w.split == "train" else " --single-view",
        cfg_hash=hash_of(lambda c, w: {"extract": c["extract"]}),
    log:
        log_path("extract_codes", "{tok}/{split}"),
    benchmark:
        benchmark_path("extract_codes", "{tok}/{split}")
    threads: res_threads
    resources:
        **MODEL_JOB,
    shell:
        "DND_RULE={rule} OMP_NUM_THREADS={threads} {PYTHON} -m dnd extract_codes --config {params.config} --tokenizer {wildcards.tok}"
        " --model {input.model} --data {params.data} --out {params.out}{params.views} > {log} 2>&1"
