#!/usr/bin/env python
"""Render the Hugging Face model cards and the README model table from ``model_cards/<family>.yaml``.

    python model_cards/render.py --check          # exit 1 if README's model table is stale
    python model_cards/render.py --write          # rewrite the table between the markers
    python model_cards/render.py --card pce_resnet18.in1k [--out README.md]   # print / write one Hub card

The schema of the YAML files is in pce_timm/release/cards.py (``example.yaml`` is a complete, commented
instance); the renderer is pce_timm/release/render.py.
"""
import sys

from pce_timm.release.render import main

if __name__ == '__main__':
    sys.exit(main())
