"""The peer benchmark: imgsvc against thumbor, ipx and a plain pyvips reference (`python compare.py`)."""
