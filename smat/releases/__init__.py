"""The authors' released checkpoints, converted into this package's model format (`smat import`, `official.py`).

The release formats are named here, without torch, for the command line and the workflow: the names of
`smat import`'s subcommands and of config `released.*.format`, and where each is published.
"""

SMAT_RELEASE, PMF_RELEASE = "smat-official", "pmf"

PUBLISHED_AT = {
    SMAT_RELEASE: "the Hugging Face collection szcjerry/meta-tuned-smat-vits (checkpoint.pt)",
    PMF_RELEASE: "the Hugging Face model hushell/pmf_metadataset_dino, or PMF's README links (best.pth / "
                 "checkpoint.pth)",
}
