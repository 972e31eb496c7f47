"""Data pipeline: raw videos -> scene clips -> scores -> filtered, captioned training manifest.

Heavy optional libraries (OpenCV, PySceneDetect, rapidocr, vision models) are imported
only by the stage that needs them: ``pip install "easyanimate-rt[data]"``.
"""

from easyanimate_rt.data.manifest import (
    ClipRecord,
    append_records,
    read_manifest,
    write_manifest,
)

__all__ = ["ClipRecord", "append_records", "read_manifest", "write_manifest"]
