//! Property tests of the two parsers every client reaches before anything
//! else: the client frame parser and the token check. Whatever the input —
//! arbitrary bytes, deep nesting, huge numbers, extreme claim values signed
//! with the right key — they answer with a value or an error, never a panic,
//! and what they accept keeps its promises.

use jsonwebtoken::{EncodingKey, Header};
use proptest::prelude::*;
use serde_json::{Value, json};
use sockets_host::auth::{Authenticator, MAX_EXP};
use sockets_host::config::JwtConfig;
use sockets_host::protocol::{is_valid_event_name, parse_client_frame};

const SECRET: &str = "property-test-secret";

fn authenticator() -> Authenticator {
    Authenticator::new(&JwtConfig::with_secret(SECRET)).unwrap()
}

fn signed(claims: &Value) -> String {
    jsonwebtoken::encode(
        &Header::default(),
        claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

/// Any JSON value, nested a few levels.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n)),
        any::<f64>()
            .prop_filter("finite", |n| n.is_finite())
            .prop_map(|n| json!(n)),
        ".{0,40}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(".{0,12}", inner, 0..6)
                .prop_map(|map| Value::Object(map.into_iter().collect())),
        ]
    })
}

/// A claim value at the extremes of what JSON can carry.
fn extreme_number() -> impl Strategy<Value = Value> {
    prop_oneof![
        any::<u64>().prop_map(|n| json!(n)),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>()
            .prop_filter("finite", |n| n.is_finite())
            .prop_map(|n| json!(n)),
        Just(json!(u64::MAX)),
        Just(json!(i64::MAX)),
        Just(json!(i64::MIN)),
        Just(json!(1e300)),
        Just(json!(-1e300)),
        Just(json!(MAX_EXP + 1)),
    ]
}

proptest! {
    // No regression files in the source tree: a failure prints its input.
    #![proptest_config(ProptestConfig {
        cases: 512,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn the_frame_parser_never_panics_on_bytes(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let text = String::from_utf8_lossy(&bytes);
        let _ = parse_client_frame(&text);
    }

    #[test]
    fn what_the_frame_parser_accepts_is_a_valid_frame(
        event in ".{0,80}",
        data in json_value(),
        ack in prop_oneof![Just(Value::Null), extreme_number(), ".{0,8}".prop_map(Value::String)],
    ) {
        let frame = json!({"event": event, "data": data, "ack": ack});
        if let Ok(parsed) = parse_client_frame(&frame.to_string()) {
            prop_assert!(is_valid_event_name(&parsed.event));
            prop_assert_eq!(parsed.ack, ack.as_u64());
            // The data is kept as the client wrote it, byte for byte (a
            // parse and re-serialization could round floats).
            prop_assert_eq!(parsed.data.get(), serde_json::to_string(&data).unwrap());
        }
    }

    #[test]
    fn any_token_text_is_answered(token in ".{0,300}") {
        let auth = authenticator();
        let _ = auth.verify(&token);
        let _ = auth.verify_bearer(&format!("Bearer {token}"));
    }

    #[test]
    fn signed_tokens_with_extreme_claims_never_break_the_check(
        exp in extreme_number(),
        nbf in prop::option::of(extreme_number()),
        sub in prop_oneof![".{0,300}".prop_map(Value::String), json_value()],
        role in prop::option::of(json_value()),
    ) {
        let mut claims = json!({"sub": sub, "exp": exp});
        if let Some(nbf) = nbf {
            claims["nbf"] = nbf;
        }
        if let Some(role) = role {
            claims["role"] = role;
        }
        if let Ok(verified) = authenticator().verify(&signed(&claims)) {
            prop_assert!(!verified.sub.is_empty() && verified.sub.len() <= 256);
            prop_assert!(verified.exp <= MAX_EXP);
            // What a connection does with an accepted token's expiry.
            let expires_at = verified.expires_at();
            let _ = sockets_host::protocol::rfc3339(expires_at);
        }
    }
}

#[test]
fn deep_nesting_is_an_error_not_a_stack_overflow() {
    for depth in [64, 1_000, 100_000] {
        let nested = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
        let frame = format!(r#"{{"event":"x","data":{nested},"ack":1}}"#);
        let _ = parse_client_frame(&frame);
        let objects = format!("{}1{}", r#"{"a":"#.repeat(depth), "}".repeat(depth));
        let _ = parse_client_frame(&format!(r#"{{"event":"x","data":{objects}}}"#));
        let _ = authenticator().verify(&signed(
            &json!({"sub": "s", "exp": MAX_EXP, "role": nested}),
        ));
    }
}

#[test]
fn huge_numbers_are_answered() {
    for ack in [
        "18446744073709551615",
        "18446744073709551616",
        "1e999",
        "-0",
        "1.0",
        &"9".repeat(10_000),
    ] {
        let _ = parse_client_frame(&format!(r#"{{"event":"x","ack":{ack}}}"#));
    }
    assert_eq!(
        parse_client_frame(r#"{"event":"x","ack":18446744073709551615}"#)
            .unwrap()
            .ack,
        Some(u64::MAX)
    );
}
