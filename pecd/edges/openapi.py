"""The OpenAPI 3.1 description of the HTTP API (served at ``/api/v1/openapi.json``), with this
provider's limits in it. Pure data: the tests check it with an independent validator and fuzz
the live API from it (schemathesis), so it must say what the server does."""

from __future__ import annotations

from typing import Any

from pecd.config import Config
from pecd.format.apimessage import RECEIPT_TYPES

_PROBLEM = {"$ref": "#/components/schemas/Problem"}


def _problems(*codes: int) -> dict[str, Any]:
    words = {400: "Bad request (the check names what)", 401: "Login needed",
             403: "Not this mailbox's to do", 404: "Not found (or not this mailbox's)",
             405: "Method not allowed", 413: "Over the size limit", 415: "Wrong media type",
             422: "Refused by the access point, or Idempotency-Key reused",
             429: "Too many failed logins (or connections from one address)", 503: "Not ready"}
    return {str(c): {"description": words[c],
                     "content": {"application/problem+json": {"schema": _PROBLEM}}}
            for c in codes}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def document(config: Config) -> dict[str, Any]:
    limits = config.limits
    address = {"type": "string", "minLength": 3, "maxLength": 400,
               "examples": ["bob@b.example"]}
    auth: list[dict[str, list[str]]] = [{"bearer": []}, {"basic": []}]
    raw = {"schema": {"type": "string", "format": "binary",
                      "maxLength": limits.max_message_size}}
    # the JSON message's fields as form parts (or all of them as JSON in one "message" part),
    # and each file part an attachment, its name and type from the part's own headers
    form = {"schema": {"type": "object", "additionalProperties": False, "properties": {
        "message": {"type": "string", "contentMediaType": "application/json",
                    "description": "The JSON message (without attachments, or with some)"},
        "from": address, "to": {"type": "array", "items": address},
        "cc": {"type": "array", "items": address},
        "subject": {"type": "string", "maxLength": 998}, "text": {"type": "string"},
        "html": {"type": "string"}, "receipt_type": {"enum": list(RECEIPT_TYPES)},
        "attachments": {"type": "array", "items": {"type": "string", "format": "binary"},
                        "description": "Files; names are plain file names (percent-decoded), "
                                       "no path"}}},
        "encoding": {"message": {"contentType": "application/json"}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "pecd HTTP API", "version": "1",
                 "description": "Send, track and verify PEC (RFC 6109) certified mail at "
                                f"{config.name}."},
        "servers": [{"url": "/"}],
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer",
                           "description": "A token from `pecd token create ADDR`"},
                "basic": {"type": "http", "scheme": "basic",
                          "description": "The mailbox address and its password"},
            },
            "schemas": {
                "Problem": {"type": "object", "required": ["type", "title", "status"],
                            "properties": {"type": {"type": "string"},
                                           "title": {"type": "string"},
                                           "status": {"type": "integer"},
                                           "detail": {"type": "string"},
                                           "check": {"type": "string"},
                                           "id": {"type": ["string", "null"]}}},
                "Attachment": {
                    "type": "object", "additionalProperties": False,
                    "required": ["filename", "content_base64"],
                    "properties": {"filename": {"type": "string", "minLength": 1,
                                                "maxLength": 255},
                                   "content_type": {"type": "string",
                                                    "examples": ["application/pdf"]},
                                   "content_base64": {"type": "string",
                                                      "contentEncoding": "base64"}}},
                "Message": {
                    "type": "object", "additionalProperties": False, "required": ["to"],
                    "properties": {
                        "from": address,
                        "to": {"type": "array", "items": address, "minItems": 1,
                               "maxItems": limits.max_recipients},
                        "cc": {"type": "array", "items": address,
                               "maxItems": limits.max_recipients},
                        "subject": {"type": "string", "maxLength": 998},
                        "text": {"type": "string"},
                        "html": {"type": "string"},
                        "receipt_type": {"enum": list(RECEIPT_TYPES)},
                        "attachments": {"type": "array",
                                        "items": {"$ref": "#/components/schemas/Attachment"}}}},
                "Accepted": {
                    "type": "object", "required": ["id", "status"],
                    "properties": {"id": {"type": ["string", "null"],
                                          "description": "The PEC identifier; null while "
                                          "the access point has not judged it yet"},
                                   "status": {"enum": ["accepted", "queued"]},
                                   "accepted_at": {"type": "string"},
                                   "queue_id": {"type": "integer"},
                                   "receipt_type": {"type": ["string", "null"]},
                                   "acceptance_receipt": {"type": ["string", "null"]},
                                   "recipients": {"type": "array", "items": {"type": "object"}}}},
                "BulkResult": {
                    "type": "object", "required": ["results"],
                    "properties": {"results": {"type": "array", "items": {
                        "type": "object", "required": ["status", "body"],
                        "properties": {"status": {"type": "integer"},
                                       "body": {"type": "object"}}}}}},
                "Timeline": {
                    "type": "object", "required": ["id", "status", "recipients", "events"],
                    "properties": {"id": {"type": "string"},
                                   "status": {"enum": ["accepted", "refused"]},
                                   "recipients": {"type": "array", "items": {"type": "object"}},
                                   "events": {"type": "array", "items": {"type": "object"}}}},
                "MessageList": {
                    "type": "object", "required": ["messages", "next"],
                    "properties": {"messages": {"type": "array", "items": {"type": "object"}},
                                   "next": {"type": ["string", "null"]}}},
                "Mailbox": {
                    "type": "object", "required": ["messages", "next"],
                    "properties": {
                        "messages": {"type": "array", "items": {
                            "type": "object",
                            "required": ["id", "sender", "subject", "delivered", "read",
                                         "read_via"],
                            "properties": {
                                "id": {"type": "string", "description": "The PEC identifier"},
                                "sender": {"type": "string"},
                                "subject": {"type": ["string", "null"]},
                                "delivered": {"type": "string"},
                                "read": {"type": ["string", "null"],
                                         "description": "When the read was evidenced (null: "
                                         "not read, or no reading evidence was asked)"},
                                "read_via": {"type": ["string", "null"],
                                             "examples": ["imap", "http"]}}}},
                        "next": {"type": ["string", "null"]}}},
                "Verdict": {
                    "type": "object", "required": ["valid", "verdict"],
                    "properties": {"valid": {"type": "boolean"},
                                   "verdict": {"type": "string"},
                                   "reason": {"type": "string"},
                                   "pec": {"type": "object"}}},
            },
        },
        "paths": {
            "/api/v1/messages": {
                "post": {
                    "summary": "Send certified mail (one message, or a list each answered on its own)",
                    "description": "JSON (attachments in base64), multipart/form-data (a "
                                   "`message` part or one part per field, a file part per "
                                   "attachment) or a raw RFC 5322 message.",
                    "security": auth,
                    "parameters": [{"name": "Idempotency-Key", "in": "header", "required": False,
                                    "schema": {"type": "string", "minLength": 1, "maxLength": 255,
                                               "pattern": "^[ -~]+$"}}],
                    "requestBody": {"required": True, "content": {
                        "application/json": {"schema": {"oneOf": [
                            {"$ref": "#/components/schemas/Message"},
                            {"type": "array", "minItems": 1, "maxItems": 500,
                             "items": {"$ref": "#/components/schemas/Message"}}]}},
                        "multipart/form-data": form,
                        "message/rfc822": raw}},
                    "responses": {
                        "202": _json({"$ref": "#/components/schemas/Accepted"},
                                     "Durable, and accepted by the access point"),
                        "200": _json({"$ref": "#/components/schemas/BulkResult"},
                                     "Bulk: one answer per message"),
                        **_problems(400, 401, 403, 413, 415, 422, 429)}},
                "get": {
                    "summary": "The mailbox's messages, oldest first, paginated",
                    "security": auth,
                    "parameters": [
                        {"name": "since", "in": "query", "schema": {"type": "string",
                                                                    "format": "date-time"}},
                        {"name": "limit", "in": "query",
                         "schema": {"type": "integer", "minimum": 1, "maximum": 500}},
                        {"name": "after", "in": "query", "schema": {"type": "string"}}],
                    "responses": {"200": _json({"$ref": "#/components/schemas/MessageList"},
                                               "A page"),
                                  **_problems(400, 401, 429)}},
            },
            "/api/v1/messages/{id}": {
                "get": {
                    "summary": "Every event of a message, per recipient, with its time",
                    "security": auth,
                    "parameters": [{"name": "id", "in": "path", "required": True,
                                    "schema": {"type": "string"}}],
                    "responses": {"200": _json({"$ref": "#/components/schemas/Timeline"},
                                               "The timeline"),
                                  **_problems(401, 404, 429)}},
            },
            "/api/v1/messages/{id}/evidence": {
                "get": {
                    "summary": "A zip of the receipts, ledger rows, checkpoint and a report",
                    "security": auth,
                    "parameters": [{"name": "id", "in": "path", "required": True,
                                    "schema": {"type": "string"}}],
                    "responses": {"200": {"description": "The archive", "content": {
                        "application/zip": {"schema": {"type": "string",
                                                       "format": "binary"}}}},
                                  **_problems(401, 404, 429)}},
            },
            "/api/v1/mailbox": {
                "get": {
                    "summary": "The certified messages delivered to this mailbox, oldest first",
                    "operationId": "listMailbox",
                    "security": auth,
                    "parameters": [
                        {"name": "limit", "in": "query",
                         "schema": {"type": "integer", "minimum": 1, "maximum": 500}},
                        {"name": "after", "in": "query", "schema": {"type": "string"}}],
                    "responses": {"200": {**_json({"$ref": "#/components/schemas/Mailbox"},
                                                  "A page"),
                                          "links": {"download": {
                                              "operationId": "downloadMessage",
                                              "parameters": {
                                                  "id": "$response.body#/messages/0/id"}}}},
                                  **_problems(400, 401, 429)}},
            },
            "/api/v1/mailbox/{id}": {
                "get": {
                    "summary": "Download a certified message delivered to this mailbox (the "
                               "transport envelope); the first download is a read and, when "
                               "the sender asked, sends the proof of reading",
                    "operationId": "downloadMessage",
                    "security": auth,
                    "parameters": [{"name": "id", "in": "path", "required": True,
                                    "schema": {"type": "string"}}],
                    "responses": {"200": {"description": "The envelope as delivered",
                                          "content": {"message/rfc822": {"schema": {
                                              "type": "string", "format": "binary"}}}},
                                  **_problems(401, 404, 429, 503)}},
            },
            "/api/v1/verify": {
                "post": {
                    "summary": "Judge a signed PEC message, as `pecd verify` does (no login)",
                    "security": [],
                    "requestBody": {"required": True, "content": {"message/rfc822": raw,
                                                                  "application/octet-stream": raw}},
                    "responses": {"200": _json({"$ref": "#/components/schemas/Verdict"},
                                               "The verdict"),
                                  **_problems(400, 413)}},
            },
            "/api/v1/openapi.json": {
                "get": {"summary": "This document", "security": [],
                        "responses": {"200": _json({"type": "object"}, "OpenAPI 3.1")}}},
            "/metrics": {
                "get": {"summary": "Prometheus metrics", "security": [],
                        "responses": {"200": {"description": "Prometheus text format",
                                              "content": {"text/plain": {"schema": {
                                                  "type": "string"}}}}}}},
            "/healthz": {
                "get": {"summary": "The process answers", "security": [],
                        "responses": {"200": _json({"type": "object"}, "Alive")}}},
            "/readyz": {
                "get": {"summary": "Started and the database answers", "security": [],
                        "responses": {"200": _json({"type": "object"}, "Ready"),
                                      **_problems(503)}}},
        },
    }
