# Metrics: generated samples against train statistics (gFID), reconstructions against
# val statistics (rFID), and the real-data bounds (OCR of ground truth, val vs train).
# Evaluation reads `evaluate` and the data source (whether to run OCR).


def evaluate_hash(c, w):
    # depth_cost configures its own rule only.
    metrics = {k: v for k, v in c["evaluate"].items() if k != "depth_cost"}
    return {"evaluate": metrics, "source": c["data"]["source"]}


rule evaluate_samples:
    input:
        images=rules.sample.output.images,
        labels=rules.sample.output.labels,
        timing=rules.sample.output.timing,
        ref=f"{RESULTS}/data/train/fid_features.npz",
        data=data_files("train"),
    output:
        f"{RESULTS}/metrics/{{gen}}/{{sampler}}.json",
    params:
        config=exp_file,
        samples=f"{RESULTS}/samples/{{gen}}/{{sampler}}",
        data=f"{RESULTS}/data/train",
        cfg_hash=hash_of(evaluate_hash),
    log:
        log_path("evaluate_samples", "{gen}/{sampler}"),
    benchmark:
        benchmark_path("evaluate_samples", "{gen}/{sampler}")
    threads: res_threads
    resources:
        **MODEL_JOB,
    shell:
        "DND_RULE={rule} OMP_NUM_THREADS={threads} {PYTHON} -m dnd evaluate samples --config {params.config} --samples {params.samples}"
        " --ref {input.ref} --data {params.data} --out {output} > {log} 2>&1"


rule evaluate_tokenizer:
    input:
        recon=rules.reconstruct.output.recon,
        recon_metrics=rules.reconstruct.output.metrics,
        ref=f"{RESULTS}/data/val/fid_features.npz",
        data=data_files("val"),
    output:
        f"{RESULTS}/metrics/tokenizer/{{tok}}.json",
    params:
        config=exp_file,
        recon=f"{RESULTS}/tokenizer/{{tok}}/recon",
        data=f"{RESULTS}/data/val",
        cfg_hash=hash_of(evaluate_hash),
    log:
        log_path("evaluate_tokenizer", "{tok}"),
    benchmark:
        benchmark_path("evaluate_tokenizer", "{tok}")
    threads: res_threads
    resources:
        **MODEL_JOB,
    shell:
        "DND_RULE={rule} OMP_NUM_THREADS={threads} {PYTHON} -m dnd evaluate tokenizer --config {params.config} --tokenizer {wildcards.tok}"
        " --recon {params.recon} --ref {input.ref} --data {params.data} --out {output} > {log} 2>&1"


rule evaluate_reference:
    input:
        val=data_files("val"),
        train=data_files("train"),
        # Both splits' features: val-vs-train FID is the floor every generator FID is read against.
        train_ref=f"{RESULTS}/data/train/fid_features.npz",
        val_ref=f"{RESULTS}/data/val/fid_features.npz",
    output:
        f"{RESULTS}/metrics/reference.json",
    params:
        config=exp_file,
        data=f"{RESULTS}/data/val",
        train_data=f"{RESULTS}/data/train",
        cfg_hash=hash_of(evaluate_hash),
    log:
        log_path("evaluate_reference"),
    benchmark:
        benchmark_path("evaluate_reference")
    threads: res_threads
    resources:
        **MODEL_JOB,
    shell:
        "DND_RULE={rule} OMP_NUM_THREADS={threads} {PYTHON} -m dnd evaluate reference --config {params.config} --data {params.data}"
        " --train-data {params.train_data} --ref {input.val_ref} --train-ref {input.train_ref}"
        " --out {output} > {log} 2>&1"


rule depth_cost:
    # Random-weight models of every kind at every depth: needs only the config and the class count.
    input:
        data=data_files("train"),
    output:
        f"{RESULTS}/metrics/depth_cost.json",
    params:
        config=exp_file,
        data=f"{RESULTS}/data/train",
        cfg_hash=hash_of(lambda c, w: {"plan": depth_cost_plan(c), "device": c["device"]}),
    log:
        log_path("depth_cost"),
    benchmark:
        benchmark_path("depth_cost")
    threads: res_threads
    resources:
        **MODEL_JOB,
    shell:
        "DND_RULE={rule} OMP_NUM_THREADS={threads} {PYTHON} -m dnd depth_cost --config {params.config} --data {params.data}"
        " --out {output} > {log} 2>&1"
