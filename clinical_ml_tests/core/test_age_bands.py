import polars as pl
import pytest

from clinical_ml.core.features import age_band_expr


@pytest.mark.parametrize(
    ("bands", "ages", "expected"),
    [
        (
            [18, 45, 65, 80],
            [17, 18, 44, 45, 64, 65, 79, 80, 90],
            [None, "18-44", "18-44", "45-64", "45-64", "65-79", "65-79", "80+", "80+"],
        ),
        ([0, 18, 90], [0, 17, 18, 89, 90], ["0-17", "0-17", "18-89", "18-89", "90+"]),
    ],
)
def test_each_age_falls_in_its_own_band(bands, ages, expected):
    got = pl.select(age_band_expr(pl.Series(ages), bands)).to_series().to_list()
    assert got == expected
