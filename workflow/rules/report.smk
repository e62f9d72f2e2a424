# The comparison report of one experiment: HTML (self-contained) and PDF, plus its
# figures as separate files for `snakemake --report`.


def report_figure(name: str):
    return report(
        f"reports/{{exp}}/figures/{name}.png",
        caption=f"../report/{name}.rst",
        category="Figures",
        subcategory="{exp}",
        labels={"experiment": "{exp}", "figure": name},
    )


rule report:
    # Reads everything under results/{exp}/ (benchmark files included: every job that
    # writes one is upstream of this rule, so they exist when it runs).
    input:
        unpack(report_inputs),
    output:
        html=report(
            "reports/{exp}/report.html",
            caption="../report/report_html.rst",
            category="Report",
            labels={"experiment": "{exp}", "format": "html"},
        ),
        pdf="reports/{exp}/report.pdf",
        figures=[report_figure(name) for name in REPORT_FIGURES],
    params:
        config=exp_file,
        results=RESULTS,
        benchmarks=f"{RESULTS}/benchmarks",
        out="reports/{exp}",
        # The report shows the whole resolved config.
        cfg_hash=hash_of(lambda c, w: c),
    log:
        log_path("report"),
    benchmark:
        benchmark_path("report")
    threads: 1
    resources:
        **REPORT_JOB,
    shell:
        "DND_RULE={rule} OMP_NUM_THREADS={threads} {PYTHON} -m dnd report --config {params.config} --results {params.results}"
        " --benchmarks {params.benchmarks} --out {params.out} > {log} 2>&1"
