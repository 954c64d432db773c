"""Settings for the scans users have: presets expand to documented settings, explicit ones win, names are checked."""
import pytest

from DEQRegistrationLib import InputError
from DEQRegistrationLib.config import PRESETS, make_settings


def test_each_preset_sets_what_it_documents_and_explicit_settings_win():
    for name, preset in PRESETS.items():
        s = make_settings(preset=name)
        assert s.preset == name and preset["about"]
        for key, value in preset["settings"].items():
            assert getattr(s, key) == value, (name, key)
    s = make_settings(preset="multimodal", similarity="lncc", init="rigid")
    assert (s.similarity, s.init, s.init_similarity) == ("lncc", "rigid", "mi")


def test_the_alignment_similarity_follows_the_deformable_one_unless_given():
    assert make_settings().alignment_similarity == "ncc"
    assert make_settings(similarity="mind").alignment_similarity == "ncc"  # mi drifts on identical pairs
    assert make_settings(similarity="mind", init_similarity="mi").alignment_similarity == "mi"


@pytest.mark.parametrize("kwargs, match", [
    (dict(preset="knee"), "unknown preset 'knee'"),
    (dict(init="deformable"), "unknown init 'deformable'"),
    (dict(init_similarity="mind"), "unknown init_similarity 'mind'"),
    (dict(similarity="ssd"), "unknown similarity 'ssd'"),
    (dict(fixed_msk=1), "unknown setting"),
    (dict(update="learned", model="default", similarity="mind"), "similarity set the gradient update"),
])
def test_bad_settings_are_refused_by_name(kwargs, match):
    with pytest.raises(InputError, match=match):
        make_settings(**kwargs)
