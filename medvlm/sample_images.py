"""Real medical images that ship inside installed packages (pydicom's test files and ``pydicom-data``).

They let the demo and the tests run on real CT, MR, CR (X-ray) and ultrasound pixels with no download.
Each entry records what a radiologist would say the file shows, from its DICOM header.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class SampleImage:
    name: str             # file name
    package: str          # "pydicom" (test files) or "pydicom-data"
    modality: str         # CT | MRI | X-ray | ultrasound
    body_part: str
    description: str

    @property
    def path(self) -> Path:
        return sample_path(self.name, self.package)


SAMPLES = (
    SampleImage("CT_small.dcm", "pydicom", "CT", "chest", "a small axial CT slice at the level of a thoracic vertebra"),
    SampleImage("693_UNCI.dcm", "pydicom-data", "CT", "head", "an axial non-contrast CT slice in a soft-tissue window"),
    SampleImage("MR_small.dcm", "pydicom", "MRI", "head", "a small axial MR image"),
    SampleImage("MR2_UNCI.dcm", "pydicom-data", "MRI", "shoulder", "an MR image of the shoulder"),
    SampleImage("emri_small.dcm", "pydicom-data", "MRI", "head", "a multi-frame MR series of the head"),
    SampleImage("MR-SIEMENS-DICOM-WithOverlays.dcm", "pydicom-data", "MRI", "abdomen", "an abdominal MR image with a marked liver lesion"),
    SampleImage("RG1_UNCI.dcm", "pydicom-data", "X-ray", "chest", "a computed radiograph of the chest"),
    SampleImage("RG3_UNCI.dcm", "pydicom-data", "X-ray", "leg", "a radiograph of the distal tibia with a non-ossifying fibroma"),
    SampleImage("US1_UNCI.dcm", "pydicom-data", "ultrasound", "neck", "a colour Doppler ultrasound image of a lymph node"),
    SampleImage("OBXXXX1A.dcm", "pydicom-data", "ultrasound", "pelvis", "an obstetric ultrasound image"),
    SampleImage("gdcm-US-ALOKA-16.dcm", "pydicom-data", "ultrasound", "abdomen", "an ultrasound image"),
)


def sample_path(name: str, package: str) -> Path:
    if package == "pydicom":
        import pydicom

        path = Path(pydicom.__file__).parent / "data" / "test_files" / name
    elif package == "pydicom-data":
        try:
            import data_store  # the import name of the pydicom-data distribution
        except ImportError as exc:
            raise FileNotFoundError(f"{name} ships in pydicom-data: pip install pydicom-data") from exc
        path = Path(data_store.__file__).parent / "data" / name
    else:
        raise ValueError(f"unknown package {package!r}")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: expected in the installed {package} package; reinstall it")
    return path


def by_modality() -> dict[str, list[SampleImage]]:
    groups: dict[str, list[SampleImage]] = {}
    for sample in SAMPLES:
        groups.setdefault(sample.modality, []).append(sample)
    return groups
