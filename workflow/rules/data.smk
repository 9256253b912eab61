rule build_embedded:
    output:
        directory(EMBEDDED_RAW),
    log:
        "logs/build_embedded.log",
    benchmark:
        "results/benchmarks/build_embedded/embedded.tsv"
    conda:
        "../../envs/smat.yaml"
    threads: 1
    resources:
        runtime=per_attempt(10),
        mem_mb=per_attempt(2000),
    params:
        size=config["embedded"]["size"],
        seed=config["embedded"]["seed"],
    shell:
        "smat data build-embedded --out {output} --size {params.size} --seed {params.seed} > {log} 2>&1"


rule convert_dataset:
    input:
        unpack(conversion_inputs),
    output:
        manifest="resources/data/{dataset}/manifest.json",
        images="resources/data/{dataset}/images.npy",
    log:
        "logs/convert_dataset/{dataset}.log",
    benchmark:
        "results/benchmarks/convert_dataset/{dataset}.tsv"
    conda:
        "../../envs/smat.yaml"
    threads: 1  # decoding processes (--workers); the paper profile sets 4
    resources:
        runtime=per_attempt(10),
        mem_mb=per_attempt(2000),
    params:
        format=lambda wildcards: rule_args.source_format(config, wildcards.dataset),
        src=lambda wildcards: rule_args.source_folder(config, wildcards.dataset),
        out=lambda wildcards, output: os.path.dirname(output.manifest),
        options=lambda wildcards: rule_args.conversion_args(config, wildcards.dataset),
    shell:
        "smat data convert {params.format} {params.src:q} --out {params.out} --domain {wildcards.dataset} "
        "--workers {threads} {params.options} > {log} 2>&1"
