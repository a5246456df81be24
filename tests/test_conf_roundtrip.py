"""Round trips of corosync.conf: parse(render(m)) == m over generated configs.

The generated models cover every typed field (set or unset), nodes, quorum devices, logging and
unknown content kept at every level (entries and nested sections, in any order). Typed string
fields get arbitrary text, because `parse` keeps values and only `validate` judges them.
"""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from pmxfs.core import conf

names = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,8}", fullmatch=True)
extra_names = names.map(lambda n: f"x_{n}")  # never a key pmxfs knows
values = (
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E, blacklist_characters="{}")
            | st.sampled_from(["é", "ü", "ß"]), min_size=1, max_size=20)
    .map(str.strip)
    .filter(bool)
)
u32 = st.integers(0, 2**32 - 1)


def opt(strategy: st.SearchStrategy[object]) -> st.SearchStrategy[object]:
    return st.none() | strategy


def raw_items(keys: st.SearchStrategy[str], depth: int = 2) -> st.SearchStrategy[conf.RawItem]:
    entry = st.builds(conf.RawEntry, keys, values)
    if depth == 0:
        return entry
    section = st.builds(conf.RawSection, keys,
                        st.lists(raw_items(names, depth - 1), max_size=3).map(tuple))
    return entry | section


def extras(keys: st.SearchStrategy[str] = extra_names) -> st.SearchStrategy[tuple[object, ...]]:
    return st.lists(raw_items(keys), max_size=3).map(tuple)


totems = st.builds(
    conf.TotemSection,
    cluster_name=opt(values),
    config_version=opt(st.integers(0, 2**64 - 1)),
    transport=opt(st.sampled_from(["udpu", "udp", "knet"]) | values),
    mcastaddr=opt(st.sampled_from(["239.192.7.9", "ff15::1"]) | values),
    port=opt(u32),
    netmtu=opt(u32),
    token=opt(u32),
    token_coefficient=opt(u32),
    token_retransmit=opt(u32),
    token_retransmits_before_loss_const=opt(u32),
    hold=opt(u32),
    consensus=opt(u32),
    join=opt(u32),
    merge=opt(u32),
    downcheck=opt(u32),
    fail_recv_const=opt(u32),
    seqno_unchanged_const=opt(u32),
    window_size=opt(u32),
    max_messages=opt(u32),
    miss_count_const=opt(u32),
    extras=extras(),
)

nodes = st.builds(
    conf.NodeEntry,
    name=opt(values),
    nodeid=opt(u32),
    ring0_addr=opt(st.sampled_from(["10.0.0.1", "fd00::1", "pve1.example.com"]) | values),
    quorum_votes=opt(u32),
    extras=extras(),
)

nets = st.builds(
    conf.DeviceNetSection,
    host=opt(values),
    port=opt(u32),
    algorithm=opt(st.sampled_from(["ffsplit", "lms"]) | values),
    tie_breaker=opt(values),
    extras=extras(),
)

devices = st.builds(
    conf.DeviceSection,
    model=opt(values),
    votes=opt(u32),
    net=opt(nets),
    extras=extras(),
)

atb_nodes = st.sampled_from(["lowest", "highest"]) | st.lists(
    st.integers(1, 2**32 - 1), min_size=1, max_size=4).map(tuple)

quorums = st.builds(
    conf.QuorumSection,
    provider=opt(values),
    expected_votes=opt(u32),
    two_node=opt(st.booleans()),
    wait_for_all=opt(st.booleans()),
    last_man_standing=opt(st.booleans()),
    last_man_standing_window=opt(u32),
    auto_tie_breaker=opt(st.booleans()),
    auto_tie_breaker_node=opt(atb_nodes),
    device=opt(devices),
    extras=extras(),
)

configs = st.builds(
    conf.ClusterConfig,
    totem=totems,
    nodes=st.lists(nodes, max_size=5).map(tuple),
    quorum=quorums,
    logging=st.builds(conf.LoggingSection, st.lists(raw_items(names), max_size=4).map(tuple)),
    nodelist_extras=extras(),
    extras=extras(),
)


@settings(max_examples=200, deadline=None)
@given(configs)
def test_parse_render_round_trip(model: conf.ClusterConfig) -> None:
    text = conf.render(model)
    assert conf.parse(text) == model


@settings(max_examples=100, deadline=None)
@given(configs)
def test_rendering_a_parsed_file_gives_the_same_text(model: conf.ClusterConfig) -> None:
    text = conf.render(model)
    assert conf.render(conf.parse(text)) == text


@settings(max_examples=100, deadline=None)
@given(configs, st.randoms(use_true_random=False))
def test_comments_blank_lines_and_indentation_do_not_change_content(
        model: conf.ClusterConfig, rnd: random.Random) -> None:
    lines = []
    for line in conf.render(model).splitlines():
        if rnd.random() < 0.3:
            lines.append(" " * rnd.randint(0, 4) + "# a comment: { not a section }")
        if rnd.random() < 0.2:
            lines.append("")
        lines.append("\t" * rnd.randint(0, 2) + line.strip() + " " * rnd.randint(0, 2))
    assert conf.parse("\n".join(lines)) == model


@settings(max_examples=100, deadline=None)
@given(configs, st.randoms(use_true_random=False))
def test_order_of_a_file_is_kept_and_content_survives_reordering(
        model: conf.ClusterConfig, rnd: random.Random) -> None:
    """Top-level sections in any order: same model, and rendering keeps the file's order.

    Kept (unknown) top-level blocks stay in their relative order: their order is content."""
    blocks = [b.strip("\n") for b in conf.render(model).split("\n\n") if b.strip()]
    kept = [b for b in blocks if b.startswith("x_")]
    rnd.shuffle(blocks)
    kept_iter = iter(kept)
    blocks = [next(kept_iter) if b.startswith("x_") else b for b in blocks]
    text = "\n\n".join(blocks) + "\n" if blocks else ""
    parsed = conf.parse(text)
    assert parsed == model
    assert conf.render(parsed) == text


def test_round_trip_of_a_config_built_in_code_renders_alphabetically() -> None:
    model = conf.ClusterConfig(
        totem=conf.TotemSection(cluster_name="lab", config_version=1, token=5000),
        nodes=(conf.NodeEntry("pve1", 1, "10.0.0.1", 1),),
        quorum=conf.QuorumSection(provider="corosync_votequorum", two_node=False,
                                  auto_tie_breaker_node=(2, 1)),
    )
    text = conf.render(model)
    assert text == (
        "nodelist {\n  node {\n    name: pve1\n    nodeid: 1\n    quorum_votes: 1\n"
        "    ring0_addr: 10.0.0.1\n  }\n}\n\n"
        "quorum {\n  auto_tie_breaker_node: 2 1\n  provider: corosync_votequorum\n"
        "  two_node: 0\n}\n\n"
        "totem {\n  cluster_name: lab\n  config_version: 1\n  token: 5000\n}\n"
    )
    assert conf.parse(text) == model
