"""The JSON schema the structured-output tests hold answers to."""

#: What the acceptance asks for: nested objects, arrays, enums, required fields. Strings
#: and numbers are bounded so that random weights cannot run past max_tokens inside one.
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "role": {"enum": ["gateway", "relay", "server"]},
        "blocks": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99}, "maxItems": 4},
        "peer": {
            "type": "object",
            "properties": {"reachable": {"type": "boolean"}, "port": {"type": "integer", "minimum": 1, "maximum": 65535}},
            "required": ["reachable", "port"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "role", "blocks", "peer"],
    "additionalProperties": False,
}
