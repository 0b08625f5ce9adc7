"""core."""

from __future__ import annotations

from blyanproxy.core.affinity import AffinitySource, affinity_key, choose_by_key, parse_affinity_source
from blyanproxy.core.booleans import boolean_word, parse_boolean
from blyanproxy.core.errors import ProxyError, write_error
from blyanproxy.core.fleetedit import Change
from blyanproxy.core.fleetstate import (
    FleetState,
    StateError,
    StateStore,
    StoreConflict,
    StoreUnavailable,
    merge,
    node_from_json,
    node_to_json,
    state_from_json,
    state_to_json,
)
from blyanproxy.core.headers import RawHeaders, client_facts, downstream_response_headers, upstream_request_headers
from blyanproxy.core.healthstate import (
    DOWN,
    UP,
    HealthRules,
    after_probe,
    after_traffic_failure,
    after_traffic_success,
    readmit_after_cooldown,
    usable,
)
from blyanproxy.core.noderules import NodeFieldError, node_name, node_tags, node_weight, url_taken
from blyanproxy.core.nodes import Node, NodeRegistry, NodeStats, new_node_id
from blyanproxy.core.nodeurl import parse_base_url
from blyanproxy.core.routing import Route, parse_route, route_allows
from blyanproxy.core.selection import POLICIES, Candidate, Policy, Turn, route_members
from blyanproxy.core.trust import ForwardTrust, parse_forward_trust

__all__ = [
    "AffinitySource",
    "Candidate",
    "Change",
    "DOWN",
    "FleetState",
    "ForwardTrust",
    "HealthRules",
    "Node",
    "NodeFieldError",
    "NodeRegistry",
    "NodeStats",
    "POLICIES",
    "Policy",
    "ProxyError",
    "RawHeaders",
    "Route",
    "StateError",
    "StateStore",
    "StoreConflict",
    "StoreUnavailable",
    "Turn",
    "UP",
    "affinity_key",
    "after_probe",
    "after_traffic_failure",
    "after_traffic_success",
    "boolean_word",
    "choose_by_key",
    "client_facts",
    "downstream_response_headers",
    "merge",
    "new_node_id",
    "node_from_json",
    "node_name",
    "node_tags",
    "node_to_json",
    "node_weight",
    "parse_affinity_source",
    "parse_base_url",
    "parse_boolean",
    "parse_forward_trust",
    "parse_route",
    "readmit_after_cooldown",
    "route_allows",
    "route_members",
    "state_from_json",
    "state_to_json",
    "upstream_request_headers",
    "url_taken",
    "usable",
    "write_error",
]
