if "fetch" in config["backbone"]:

    # Downloads need the internet: on a cluster this runs on the login node (localrule), once.
    rule fetch_backbone:
        output:
            PRETRAINED,
        params:
            source=config["backbone"]["fetch"]["source"],
            sha256=lambda wildcards: (
                f"--sha256 {config['backbone']['fetch']['sha256']}"
                if config["backbone"]["fetch"]["sha256"]
                else ""
            ),
        log:
            f"logs/fetch_backbone/{BACKBONE}.log",
        conda:
            "../../envs/smat.yaml"
        localrule: True
        shell:
            "smat fetch {params.source:q} --arch {BACKBONE} {params.sha256} --out {output} > {log} 2>&1"

else:

    # No pre-trained weights can be downloaded offline: pre-train the tiny ViT on the ID train classes.
    rule pretrain_backbone:
        input:
            config=project_path(config["backbone"]["pretrain"]["config"]),
            stores=[manifest(d) for d in ID_DATASETS],
        output:
            PRETRAINED,
        params:
            stores=[store(d) for d in ID_DATASETS],
            device=DEVICE,
        log:
            f"logs/pretrain_backbone/{BACKBONE}.log",
        benchmark:
            f"results/benchmarks/pretrain_backbone/{BACKBONE}.tsv"
        conda:
            "../../envs/smat.yaml"
        threads: JOBS["pretrain"]["threads"]
        resources:
            runtime=runtime("pretrain"),
            mem_mb=mem_mb("pretrain"),
            gpu=gpus("pretrain"),
            gpu_model=gpu_model("pretrain"),
        shell:
            "smat pretrain --store {params.stores} --config {input.config} --out {output} "
            "--device {params.device} > {log} 2>&1"
