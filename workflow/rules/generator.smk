# Generators: training on the extracted codes, then sampling with every sampler.


def generator_codes_dir(wildcards, split: str = "train") -> str:
    return f"results/{wildcards.exp}/codes/{generator_tokenizer(wildcards)}/{split}"


def generator_codes(wildcards) -> dict[str, str]:
    codes = generator_codes_dir(wildcards)
    return {"codes": f"{codes}/codes.npy", "code_labels": f"{codes}/labels.npy",
            "code_manifest": f"{codes}/manifest.json"}


rule train_generator:
    input:
        unpack(generator_codes),
        data_files("train"),
        tokenizer=tokenizer_model,
    output:
        model=f"{RESULTS}/generators/{{gen}}/model.pt",
        losses=f"{RESULTS}/generators/{{gen}}/losses.csv",
    params:
        config=exp_file,
        codes=generator_codes_dir,
        data=f"{RESULTS}/data/train",
        cfg_hash=hash_of(lambda c, w: {"generator": generator_trajectory(c["generators"][w.gen]), "seed": c["seed"]}),
    log:
        log_path("train_generator", "{gen}"),
    benchmark:
        benchmark_path("train_generator", "{gen}")
    threads: res_threads
    resources:
        **TRAIN_JOB,
    shell:
        "DND_RULE={rule} OMP_NUM_THREADS={threads} {PYTHON} -m dnd train_generator --config {params.config} --generator {wildcards.gen}"
        " --codes {params.codes} --data {params.data} --tokenizer-model {input.tokenizer}"
        " --out {output.model} --processes {resources.gpu} > {log} 2>&1"


rule sample:
    input:
        model=rules.train_generator.output.model,
        tokenizer=tokenizer_model,
    output:
        codes=f"{RESULTS}/samples/{{gen}}/{{sampler}}/codes.npy",
        labels=f"{RESULTS}/samples/{{gen}}/{{sampler}}/labels.npy",
        images=f"{RESULTS}/samples/{{gen}}/{{sampler}}/images.npy",
        grid=report(
            f"{RESULTS}/samples/{{gen}}/{{sampler}}/grid.png",
            caption="../report/sample_grid.rst",
            category="Samples",
            subcategory="{exp}",
            labels={"generator": "{gen}", "sampler": "{sampler}"},
        ),
        timing=f"{RESULTS}/samples/{{gen}}/{{sampler}}/timing.json",
    params:
        config=exp_file,
        out=f"{RESULTS}/samples/{{gen}}/{{sampler}}",
        cfg_hash=hash_of(lambda c, w: {"sampler": c["samplers"][w.sampler], "seed": c["seed"]}),
    log:
        log_path("sample", "{gen}/{sampler}"),
    benchmark:
        benchmark_path("sample", "{gen}/{sampler}")
    threads: res_threads
    resources:
        **MODEL_JOB,
    shell:
        "DND_RULE={rule} OMP_NUM_THREADS={threads} {PYTHON} -m dnd sample --config {params.config} --generator {wildcards.gen}"
        " --sampler {wildcards.sampler} --model {input.model} --tokenizer-model {input.tokenizer}"
        " --out {params.out} > {log} 2>&1"


rule heldout_loss:
    # The trained generator's cross-entropy on the val split's codes against as many train
    # codes (eval mode): the memorisation gap that losses.csv cannot show.
    input:
        model=rules.train_generator.output.model,
        val=lambda w: f"{generator_codes_dir(w, 'val')}/manifest.json",
        train=lambda w: f"{generator_codes_dir(w)}/manifest.json",
    output:
        f"{RESULTS}/metrics/heldout/{{gen}}.json",
    params:
        config=exp_file,
        val=lambda w: generator_codes_dir(w, "val"),
        train=generator_codes_dir,
    log:
        log_path("heldout_loss", "{gen}"),
    benchmark:
        benchmark_path("heldout_loss", "{gen}")
    threads: res_threads
    resources:
        **MODEL_JOB,
    shell:
        "DND_RULE={rule} OMP_NUM_THREADS={threads} {PYTHON} -m dnd heldout_loss --config {params.config} --generator {wildcards.gen}"
        " --model {input.model} --codes {params.val} --train-codes {params.train} --out {output} > {log} 2>&1"
