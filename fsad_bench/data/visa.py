"""Reader of VisA's split CSV (``layout = "visa"``): ``<root>/split_csv/1cls.csv`` with the columns
``object, split, label, image, mask`` (split ``train``/``test``, label ``normal``/``anomaly``; image and
mask paths relative to ``<root>``). Categories are the ``object`` values.
"""

from __future__ import annotations

import csv
from pathlib import Path

from fsad_bench.data.dataset import CategorySplit, Dataset, TestSample, check_split, existing_root, select_categories
from fsad_bench.errors import FsadError

VISA_SPLIT = Path("split_csv") / "1cls.csv"


class VisaDataset(Dataset):
    """VisA's official split: ``<root>/split_csv/1cls.csv`` (``csv`` overrides the file).

    Rows ``object, split, label, image, mask``; train rows must be ``normal``; test rows
    ``normal`` (no mask) or ``anomaly`` (mask path, or empty for an all-zero mask). Defect
    name in results: ``anomaly``.
    """

    def __init__(
        self,
        root: str | Path,
        name: str | None = None,
        categories: list[str] | None = None,
        csv_path: str | Path | None = None,
    ):
        self.root = existing_root(root, f"a VisA folder with {VISA_SPLIT}")
        self.name = name or self.root.name
        self.csv_path = Path(csv_path).expanduser() if csv_path else self.root / VISA_SPLIT
        if not self.csv_path.is_file():
            raise FsadError(
                f"VisA split file {self.csv_path} does not exist (expected columns object,split,label,image,mask)"
            )
        self._rows: dict[str, list[dict[str, str]]] = {}
        try:
            with self.csv_path.open(newline="") as f:
                reader = csv.DictReader(f)
                need = {"object", "split", "label", "image", "mask"}
                if not need <= set(reader.fieldnames or []):
                    raise FsadError(
                        f"{self.csv_path}: expected columns object,split,label,image,mask, "
                        f"got {','.join(reader.fieldnames or [])}"
                    )
                for row in reader:
                    self._rows.setdefault(row["object"].strip(), []).append(row)
        except (OSError, UnicodeDecodeError, csv.Error) as err:
            raise FsadError(f"cannot read VisA split file {self.csv_path}: {err}") from None
        self.categories = select_categories(
            sorted(self._rows), categories, self.root, f"rows with object {{c}} in {self.csv_path}"
        )
        self._splits: dict[str, CategorySplit] = {}

    def _path(self, rel: str, line: str) -> Path:
        p = self.root / rel.strip()
        if not p.is_file():
            raise FsadError(f"{self.csv_path}: {line} names {p}, which does not exist")
        return p

    def split(self, category: str) -> CategorySplit:
        if category not in self.categories:
            raise self._unknown(category)
        if category in self._splits:
            return self._splits[category]
        train: list[Path] = []
        test: list[TestSample] = []
        for row in self._rows[category]:
            split, label = row["split"].strip().lower(), row["label"].strip().lower()
            what = f"row {category},{row['split']},{row['label']},{row['image']}"
            if label not in ("normal", "anomaly") or split not in ("train", "test"):
                raise FsadError(f"{self.csv_path}: {what}: expected split train|test and label normal|anomaly")
            image = self._path(row["image"], what)
            if split == "train":
                if label != "normal":
                    raise FsadError(f"{self.csv_path}: {what}: a training image must be normal")
                train.append(image)
            elif label == "normal":
                test.append(TestSample(image, 0, "good", None))
            else:
                mask = self._path(row["mask"], what) if (row.get("mask") or "").strip() else None
                test.append(TestSample(image, 1, "anomaly", mask))
        split = check_split(
            CategorySplit(self.name, category, self.root / category, sorted(train), test), self.csv_path
        )
        self._splits[category] = split
        return split
