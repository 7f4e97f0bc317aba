"""The encounter lookup of ingestion (:func:`clinical_ml.core.ingestion._row_index_in`) where keys share slots."""

import polars as pl


def test_lookup_is_exact_when_many_keys_share_a_slot_of_its_table():
    from clinical_ml.core.ingestion import _row_index_in

    # 5,000 keys in a table of 2**18 slots: ~100 keys share a slot whatever the seed, so both the
    # slot lookup and the join of the shared slots' values are exercised
    keys = [f"{i:010d}" for i in range(0, 50_000, 10)]
    values = [f"{i:010d}" for i in range(0, 50_000, 3)] + [None, "", " 0000000000", "0000000000 "]
    found = _row_index_in(pl.Series(values, dtype=pl.String), pl.Series(keys, dtype=pl.String))
    position = {k: i for i, k in enumerate(keys)}
    assert found.dtype == pl.UInt32
    assert found.to_list() == [position.get(v) for v in values]  # type: ignore[arg-type]
