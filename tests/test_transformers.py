"""Saved pce folders in Hugging Face transformers: AutoModelForImageClassification and the pipeline.

transformers wraps timm models (TimmWrapper): it builds the architecture from config.json on the meta device,
then loads model.safetensors. Needs the `transformers` extra (`pip install pce_timm[transformers]`; `make venv`
installs it).
"""
import json

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import pce_timm
from pce_timm.train.checkpoint import save_model_dir

transformers = pytest.importorskip(
    'transformers', reason='needs the transformers extra: pip install -e .[transformers] (make venv installs it)')

LABELS = ['cat', 'dog', 'bird']
DATA_CONFIG = {'input_size': (3, 32, 32), 'mean': (0.5, 0.5, 0.5), 'std': (0.25, 0.25, 0.25), 'crop_pct': 1.0,
               'interpolation': 'bilinear'}


@pytest.fixture(scope='module')
def saved(tmp_path_factory):
    """A pce_resnet18 with every PCE option that has state beyond its weights: top-1 routing, keys, attention."""
    torch.manual_seed(0)
    model = timm.create_model(
        'pce_resnet18', num_classes=len(LABELS), stem_type='cifar', channels=[8, 16, 32, 64], pce_stages=[1, 2],
        patch_size=4, num_experts=4, top_k=1, attention=True)
    for layer in pce_timm.layers.find.pce_layers(model).values():
        if layer.attn is not None:  # a trained residual branch: a fresh one starts as exactly zero
            torch.nn.init.normal_(layer.attn.proj.weight, std=0.1)
            torch.nn.init.normal_(layer.attn.offset[2].weight, std=0.1)
    model.eval()
    folder = tmp_path_factory.mktemp('saved') / 'model'
    save_model_dir(model, folder, DATA_CONFIG, LABELS)
    return model, folder


def test_config_has_num_classes_once(saved):
    _, folder = saved
    config = json.loads((folder / 'config.json').read_text())
    assert config['num_classes'] == len(LABELS) and 'num_classes' not in config['model_args']
    assert timm.create_model(f'local-dir:{folder}', pretrained=True).num_classes == len(LABELS)


def test_auto_model_gives_the_timm_model_logits(saved):
    model, folder = saved
    hf = transformers.AutoModelForImageClassification.from_pretrained(folder).eval()
    assert hf.config.id2label == dict(enumerate(LABELS))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(hf(pixel_values=x).logits, model(x), rtol=0, atol=1e-6)


def test_pipeline_classifies_with_the_label_names(saved):
    model, folder = saved
    pipe = transformers.pipeline('image-classification', model=str(folder))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8))
    predictions = pipe(image, top_k=len(LABELS))
    assert sorted(p['label'] for p in predictions) == sorted(LABELS)
    assert sum(p['score'] for p in predictions) == pytest.approx(1.0, abs=1e-5)
    # the pipeline's answer is the model's on the pipeline's own preprocessing
    pixels = pipe.image_processor(image, return_tensors='pt')['pixel_values']
    with torch.no_grad():
        probs = model(pixels).softmax(-1)[0]
    assert predictions[0]['label'] == LABELS[int(probs.argmax())]
    assert predictions[0]['score'] == pytest.approx(float(probs.max()), abs=1e-5)
