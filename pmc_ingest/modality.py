"""A keyword classifier of a figure's imaging modality from its caption (nullable when nothing matches).

The classes are the image types LLaVA-Med selected from PMC-15M (CXR/CT/MRI/histopathology/gross) plus
the ones users ask for. The class with the most keyword hits wins; ties go to the earlier class. The
keywords live in ``MODALITY_KEYWORDS`` so a user can extend them; they are whole-word regexes.
"""

from __future__ import annotations

import re

MODALITY_KEYWORDS: dict[str, list[str]] = {
    "CT": [r"CT", r"computed tomograph\w*", r"CTA", r"HRCT", r"MDCT", r"PET[-/ ]CT", r"Hounsfield"],
    "MRI": [r"MRI?", r"magnetic resonance", r"T1[- ]?weighted", r"T2[- ]?weighted", r"FLAIR", r"DWI",
            r"diffusion[- ]weighted", r"MRA", r"gadolinium"],
    "X-ray": [r"X-?rays?", r"radiograph\w*", r"CXR", r"chest film", r"mammogra\w*", r"fluoroscop\w*", r"angiogra\w*"],
    "ultrasound": [r"ultrasound", r"ultrasonograph\w*", r"sonograph\w*", r"echocardiogra\w*", r"doppler", r"US"],
    "histopathology": [r"H&E", r"hematoxylin", r"haematoxylin", r"eosin", r"histolog\w*", r"histopatholog\w*",
                       r"immunohistochem\w*", r"IHC", r"microscop\w*", r"magnification", r"stain(?:ed|ing)?",
                       r"biopsy", r"micrograph\w*", r"cytolog\w*"],
    "endoscopy": [r"endoscop\w*", r"colonoscop\w*", r"gastroscop\w*", r"bronchoscop\w*", r"laparoscop\w*", r"cystoscop\w*"],
    "fundus": [r"fundus", r"fundoscop\w*", r"retinal photograph\w*", r"OCT", r"optical coherence"],
    "dermoscopy": [r"dermoscop\w*", r"dermatoscop\w*", r"skin lesion"],
    "gross pathology": [r"gross (?:specimen|pathology|appearance|examination)", r"resected specimen", r"cut surface",
                        r"macroscopic\w*", r"intraoperative (?:view|photograph)"],
    "chart/diagram": [r"flow ?chart", r"diagram", r"schematic", r"bar (?:graph|chart)", r"plot", r"graph",
                      r"Kaplan[- ]Meier", r"forest plot", r"workflow", r"heat ?map", r"curve"],
}

# Acronyms are case-sensitive ("US" vs "us", "CT" vs "ct" in "act"); words are not.
_PATTERNS = {
    name: [re.compile(rf"(?<![A-Za-z0-9]){kw}(?![A-Za-z0-9])", 0 if not any(c.islower() for c in kw) else re.I)
           for kw in keywords]
    for name, keywords in MODALITY_KEYWORDS.items()
}


def classify_modality(caption: str) -> str | None:
    best, best_hits = None, 0
    for name, patterns in _PATTERNS.items():
        hits = sum(len(p.findall(caption)) for p in patterns)
        if hits > best_hits:
            best, best_hits = name, hits
    return best
