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
        format=lambda wildcards: source_format(wildcards.dataset),
        src=lambda wildcards: source_folder(wildcards.dataset),
        out=lambda wildcards, output: os.path.dirname(output.manifest),
        options=conversion_args,
    shell:
        "smat data convert {params.format} {params.src:q} --out {params.out} --domain {wildcards.dataset} "
        "--workers {threads} {params.options} > {log} 2>&1"
