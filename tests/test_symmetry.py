"""cola_train/symmetry.py: mixtures whose experts start identical under a uniform gate are refused."""
from __future__ import annotations

import pytest

from cola_train.config import ConfigError


def test_mole_with_pissa_init_is_refused():
    """Issue #23: identical experts under a uniform gate never separate (cola_train/symmetry.py)."""
    from cola_train.config import validate

    from conftest import compose

    with pytest.raises(ConfigError, match=r"method=lora_moe with method\.init=pissa starts every expert as the same"):
        validate(compose(["model=tiny_llama", "method=lora_moe", "method.init=pissa"]))
    validate(compose(["model=tiny_llama", "method=lora_moe"]))      # init=lora: fine
    validate(compose(["model=tiny_llama", "method=hydralora", "method.init=pissa"]))  # its router is not uniform
