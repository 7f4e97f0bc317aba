"""Clinical display names and units of model inputs, from the vocabulary: ``creatinine__last_24h`` ->
``Creatinine, last value in 24 h`` with unit ``mg/dL``, for every table a clinician reads."""

import re
from functools import cache

from clinical_ml.core.units import feature_stem, measurement_codes

# aggregation -> (words, how the unit changes: "same", "per h", "count", "h", "none")
_AGGREGATIONS = {
    "last": ("last value", "same"),
    "min": ("lowest", "same"),
    "max": ("highest", "same"),
    "mean": ("mean", "same"),
    "count": ("number of measurements", "count"),
    "slope": ("trend", "per h"),
    "time_since_last": ("hours since the last value", "none"),
    "missing": ("not measured", "none"),
}
_STATIC = {"age_years": ("Age", "years")}
# UCUM codes as a clinician writes them ("" for a dimensionless scale)
_PRINTED_UNITS = {
    "mm[Hg]": "mmHg",
    "Cel": "°C",
    "10*3/uL": "×10³/µL",
    "10*6/uL": "×10⁶/µL",
    "/min": "per min",
    "/h": "per h",
    "[iU]": "IU",
    "{score}": "points",
    "[pH]": "",
    "{INR}": "",
    "umol/L": "µmol/L",
    "ug/L": "µg/L",
}
_SUPERSCRIPTS = str.maketrans("0123456789", "⁰¹²³⁴⁵⁶⁷⁸⁹")
_CATEGORIES = {"sex": "Sex", "admission_type": "Admission type", "unit": "Unit", "site": "Site"}


@cache
def _measurements() -> dict[str, tuple[str, str]]:
    """Feature stem -> (plain name, canonical unit) of every numeric code of the vocabulary."""
    return {
        feature_stem(code): (name, printed_unit(unit)) for code, (name, unit) in measurement_codes().items()
    }


def printed_unit(ucum: str) -> str:
    """A UCUM unit as a clinician writes it: ``mm[Hg]`` -> ``mmHg``, ``Cel`` -> ``°C``, ``10*3/uL`` ->
    ``×10³/µL``; an annotation alone (``{flag}``, ``{INR}``) is no unit."""
    if ucum in _PRINTED_UNITS:
        return _PRINTED_UNITS[ucum]
    if re.fullmatch(r"\{[^}]*\}", ucum):
        return ""
    unit = re.sub(r"\{[^}]*\}", "", ucum).replace("[", "").replace("]", "")
    unit = re.sub(r"10\*(\d+)", lambda m: "×10" + m.group(1).translate(_SUPERSCRIPTS), unit)
    return re.sub(r"(?<![A-Za-z])u(?=[a-zA-Z])", "µ", unit)


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:]


def display_name_and_unit(feature: str) -> tuple[str, str]:
    """A model input's clinical name and its unit ("" when it has none).

    Examples
    --------
    >>> display_name_and_unit("creatinine__last_24h")
    ('Creatinine, last value in 24 h', 'mg/dL')
    >>> display_name_and_unit("lactate__count_24h")
    ('Lactate, number of measurements in 24 h', '')
    >>> display_name_and_unit("sex__F")
    ('Sex: F', '')
    """
    if feature in _STATIC:
        return _STATIC[feature]
    stem, _, rest = feature.partition("__")
    if stem in _CATEGORIES and rest:
        return f"{_CATEGORIES[stem]}: {rest.replace('_', ' ')}", ""
    if not rest:
        return _sentence(stem.replace("_", " ")), ""
    name, unit = _measurements().get(stem, (stem.replace("_", " "), ""))
    for agg, (words, unit_rule) in _AGGREGATIONS.items():
        if (
            rest.startswith(f"{agg}_")
            and rest.removeprefix(f"{agg}_").removesuffix("h").replace(".", "").isdigit()
        ):
            hours = rest.removeprefix(f"{agg}_").removesuffix("h")
            shown = {"same": unit, "per h": f"{unit} per h" if unit else "per h", "h": "h"}.get(unit_rule, "")
            return f"{_sentence(name)}, {words} in {hours} h", shown
    return _sentence(f"{name} ({rest.replace('_', ' ')})"), unit


def display_name(feature: str) -> str:
    """The clinical name with its unit in brackets: ``Creatinine, last value in 24 h (mg/dL)``."""
    name, unit = display_name_and_unit(feature)
    return f"{name} ({unit})" if unit else name


ATTRIBUTE_TITLES = {
    "overall": "all patients",
    "sex": "sex",
    "race_ethnicity": "race and ethnicity",
    "age_band": "age group",
}


def attribute_title(attribute: str) -> str:
    """Words for an attribute or an intersection (``"sex & age_band"`` -> ``"sex and age group"``)."""
    return " and ".join(ATTRIBUTE_TITLES.get(a, a.replace("_", " ")) for a in attribute.split(" & "))


def who(attribute: str, group: str) -> str:
    """A group in words: ``"race and ethnicity = Black"``, ``"sex and age group = F & 80+"``."""
    return f"{attribute_title(attribute)} = {group}"
