"""The paper's published Table 1 and Table 2 as data, transcribed from METHOD §6 (ViT-S/16, accuracy in %).

These numbers are only ever shown in the reference table (`smat tables reference`), never mixed into our results.
"""

from __future__ import annotations

# † = published in Hu et al. 2022, ‡ = published in Basu et al. 2023 (METHOD §6).
TABLE1_COLUMNS = (
    "†Pre", "†PMF", "SoftMerge", "SMAT",
    "‡Pre+full", "†PMF+full", "SoftMerge+full", "SMAT+full",
    "‡Pre+LoRA", "PMF+LoRA", "SMAT+LoRA",
)
# The first four columns are without fine-tuning, the others with gradient-based fine-tuning.
TABLE1_N_WITHOUT_FINETUNING = 4

TABLE1_ID = {
    "ImageNet": (73.48, 73.54, 74.33, 74.94, 73.54, 74.59, 74.71, 75.24, 74.22, 73.54, 75.72),
    "Aircraft": (62.17, 88.33, 88.80, 89.49, 75.4, 88.33, 90.6, 90.78, 80.8, 89.75, 90.71),
    "Omniglot": (54.33, 91.79, 91.24, 89.54, 78.7, 91.79, 92.01, 90.83, 80.8, 92.78, 90.99),
    "CUB": (85.37, 91.02, 91.54, 92.48, 85.4, 91.02, 91.95, 92.48, 85.8, 91.17, 92.42),
    "DTD": (83.67, 81.64, 80.98, 85.86, 86.9, 86.61, 86.84, 88.34, 86.8, 86.73, 88.28),
    "Quickdraw": (60.59, 79.23, 78.98, 78.83, 73.6, 79.23, 79.90, 78.83, 72.7, 79.23, 78.83),
    "Fungi": (56.26, 74.2, 72.40, 72.8, 54.7, 74.20, 72.40, 72.80, 59.8, 75.44, 72.80),
    "VGGFlower": (94.45, 94.12, 96.89, 97.19, 94.2, 94.12, 97.01, 97.19, 94.8, 96.05, 97.25),
}
TABLE1_ID_AVG = (71.29, 84.23, 84.40, 85.14, 77.81, 84.99, 85.56, 85.81, 79.47, 85.59, 85.88)

TABLE1_OOD = {
    "TrafficSig": (53.7, 54.37, 56.21, 58.51, 87.3, 88.85, 89.91, 90.83, 88.1, 89.14, 90.18),
    "MSCOCO": (54.58, 57.04, 55.75, 57.35, 61.5, 62.59, 62.15, 63.07, 62.1, 61.71, 63.38),
    "Cifar10": (85.64, 80.82, 84.58, 83.95, 92.48, 89.61, 91.84, 92.08, 93.33, 91.53, 92.46),
    "Cifar100": (76.86, 69.11, 70.85, 74.85, 86.13, 82.54, 85.88, 85.91, 86.17, 85.06, 85.88),
    "MNIST": (78.57, 93.33, 94.16, 94.53, 92.54, 96.44, 96.20, 96.73, 94.98, 96.41, 96.46),
    "Sketch": (47.25, 41.10, 43.30, 48.91, 56.39, 49.65, 53.85, 56.55, 57.34, 47.59, 55.63),
    "Food": (91.73, 91.37, 89.84, 92.31, 92.03, 91.73, 90.48, 92.31, 92.06, 92.01, 92.31),
    "Clipart": (55.19, 53.92, 54.83, 59.87, 67.18, 62.83, 65.50, 65.76, 66.51, 60.6, 66.07),
    "Pet": (62.64, 61.89, 63.04, 65.59, 65.08, 62.97, 63.36, 67.43, 65.06, 62.71, 67.77),
    "Cars": (34.58, 38.00, 36.21, 36.79, 40.98, 40.07, 41.62, 42.39, 39.49, 42.37, 40.05),
}
TABLE1_OOD_AVG = (64.07, 64.10, 64.87, 67.27, 74.16, 72.73, 74.08, 75.31, 74.51, 72.91, 75.02)

# Table 2 (METHOD §6): (model, MLS, Meta, DT, IE, ID, OOD, AVG); the switches are defined in METHOD §2.2.
TABLE2 = (
    ("SMAT", True, True, True, True, 85.14, 67.27, 75.21),
    ("", True, True, False, True, 85.07, 66.44, 74.74),
    ("", True, True, True, False, 84.77, 67.02, 74.90),
    ("", True, False, True, True, 82.35, 63.64, 71.95),
    ("", False, True, True, False, 85.21, 66.21, 74.75),
    ("PMF", False, False, False, False, 84.23, 64.09, 73.05),
)
