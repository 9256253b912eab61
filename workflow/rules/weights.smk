if "fetch" in config["backbone"]:

    # Downloads need the internet: on a cluster this runs on the login node (localrule), once. A local
    # file (the embedded default's committed backbone) is an input, so a changed file is fetched again.
    FETCH_SOURCE = project_path(config["backbone"]["fetch"]["source"])

    rule fetch_backbone:
        input:
            [FETCH_SOURCE] if Path(FETCH_SOURCE).is_file() else [],
        output:
            PRETRAINED,
        log:
            f"logs/fetch_backbone/{BACKBONE}.log",
        localrule: True
        conda:
            "../../envs/smat.yaml"
        params:
            source=lambda wildcards, input: input[0] if input else FETCH_SOURCE,
            arch=BACKBONE,
            sha256=lambda wildcards: (
                f"--sha256 {config['backbone']['fetch']['sha256']}" if config["backbone"]["fetch"]["sha256"] else ""
            ),
        shell:
            "smat fetch {params.source:q} --arch {params.arch} {params.sha256} --out {output} > {log} 2>&1"

else:

    # Pre-train the backbone here (offline) on the train classes of the pre-training corpus; the
    # architecture is backbone.arch, the recipe the pre-training yaml.
    rule pretrain_backbone:
        input:
            config=project_path(config["backbone"]["pretrain"]["config"]),
            stores=[manifest(d) for d in PRETRAIN_DATASETS],
        output:
            PRETRAINED,
        log:
            f"logs/pretrain_backbone/{BACKBONE}.log",
        benchmark:
            f"results/benchmarks/pretrain_backbone/{BACKBONE}.tsv"
        conda:
            "../../envs/smat.yaml"
        threads: 2
        resources:
            runtime=per_attempt(30),
            mem_mb=per_attempt(4000),
            gpu=GPU,
        params:
            stores=[store(d) for d in PRETRAIN_DATASETS],
            arch=BACKBONE,
            device=DEVICE,
        shell:
            "smat pretrain --store {params.stores} --config {input.config} --set arch={params.arch} "
            "--out {output} --device {params.device} > {log} 2>&1"
