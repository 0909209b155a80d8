"""What each topic keeps (SPEC.md §1): the configs declared on the topic specs, and how an existing topic's configs
are brought to them."""

from __future__ import annotations

from streams.topics import (
    DEAD_LETTER_MAX_BYTES,
    DYNAMIC_TOPIC_CONFIG,
    TAG_UPDATE_MAX_BYTES,
    TAG_UPDATES_MAX_MESSAGE_BYTES,
    TOPICS,
    configs_to_set,
)

DEFAULT_CONFIG = 5  # DescribeConfigs `config_source` of a broker default


def entry(name: str, value: str, source: int) -> tuple[str, str, bool, int, bool, list[object]]:
    """One DescribeConfigs entry as aiokafka returns it: name, value, read_only, source, is_sensitive, synonyms."""
    return (name, value, False, source, False, [])


def test_each_topic_declares_what_spec_says_it_keeps() -> None:
    """model-updates and dead-letter keep every record, tag-updates each product's latest update (compacted, not
    deleted after 7 days); the inputs and the shadow diffs keep the broker's retention."""
    assert {spec.name: spec.configs for spec in TOPICS} == {
        "products": {},
        "behavior": {},
        "tag-updates": {"cleanup.policy": "compact", "max.message.bytes": str(TAG_UPDATES_MAX_MESSAGE_BYTES)},
        "model-updates": {"cleanup.policy": "delete", "retention.ms": "-1", "retention.bytes": "-1"},
        "dead-letter": {
            "max.message.bytes": str(DEAD_LETTER_MAX_BYTES),
            "cleanup.policy": "delete",
            "retention.ms": "-1",
            "retention.bytes": "-1",
        },
        "tag-shadow-diffs": {},
    }
    assert {spec.name for spec in TOPICS if spec.configs.get("cleanup.policy") == "compact"} == {"tag-updates"}
    assert all(spec.by_product for spec in TOPICS if spec.configs.get("cleanup.policy") == "compact")
    # the largest tag update a worker sends fits the limit declared on its topic, with room for key and headers
    assert TAG_UPDATE_MAX_BYTES < TAG_UPDATES_MAX_MESSAGE_BYTES


def test_a_topic_made_with_the_old_defaults_gets_every_declared_config_and_keeps_its_own() -> None:
    """AlterConfigs replaces all of a topic's configs: the request carries the declared ones and every other config
    set on the topic itself (max.message.bytes, an operator's segment.ms), never a broker default."""
    declared = {"max.message.bytes": str(DEAD_LETTER_MAX_BYTES), "retention.ms": "-1", "retention.bytes": "-1"}
    old = [
        entry("cleanup.policy", "delete", DEFAULT_CONFIG),
        entry("retention.ms", "604800000", DEFAULT_CONFIG),
        entry("retention.bytes", "-1", DEFAULT_CONFIG),
        entry("max.message.bytes", str(DEAD_LETTER_MAX_BYTES), DYNAMIC_TOPIC_CONFIG),
        entry("segment.ms", "3600000", DYNAMIC_TOPIC_CONFIG),
    ]
    assert configs_to_set(declared, old) == {**declared, "segment.ms": "3600000"}


def test_a_topic_with_its_declared_configs_is_left_alone_and_an_operators_value_is_replaced() -> None:
    """Only a declared config the topic does not have set on itself calls for a change; its other configs stay."""
    declared = {"cleanup.policy": "compact"}
    assert configs_to_set(declared, [entry("cleanup.policy", "compact", DYNAMIC_TOPIC_CONFIG)]) is None
    changed = [
        entry("cleanup.policy", "delete", DYNAMIC_TOPIC_CONFIG),
        entry("retention.ms", "1000", DYNAMIC_TOPIC_CONFIG),
    ]
    assert configs_to_set(declared, changed) == {"cleanup.policy": "compact", "retention.ms": "1000"}


def test_a_limit_an_operator_raised_stays_and_a_lower_one_is_raised() -> None:
    """A review found an operator's 5 MiB tag-updates limit lowered to the declared 1,048,588 at the first start:
    tagstream needs at least its own limit, not at most."""
    declared = {"cleanup.policy": "compact", "max.message.bytes": str(TAG_UPDATES_MAX_MESSAGE_BYTES)}
    raised = [
        entry("cleanup.policy", "compact", DYNAMIC_TOPIC_CONFIG),
        entry("max.message.bytes", str(5 * 2**20), DYNAMIC_TOPIC_CONFIG),
    ]
    assert configs_to_set(declared, raised) is None
    lowered = [raised[0], entry("max.message.bytes", "20000", DYNAMIC_TOPIC_CONFIG)]
    assert configs_to_set(declared, lowered) == declared
    raised_but_deleting = [entry("cleanup.policy", "delete", DYNAMIC_TOPIC_CONFIG), raised[1]]
    assert configs_to_set(declared, raised_but_deleting) == {
        "cleanup.policy": "compact",
        "max.message.bytes": str(5 * 2**20),
    }
