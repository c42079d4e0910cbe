//! Canonical JSON: object keys sorted (by UTF-8 bytes) at every level, no insignificant
//! whitespace, so equal content gives equal bytes and so equal digests.
//!
//! Keys are sorted here explicitly rather than trusting `serde_json::Map` to be a `BTreeMap`: a
//! dependency anywhere in the build enabling serde_json's `preserve_order` feature would otherwise
//! silently make struct field order leak into digests.

use serde::Serialize;
use serde_json::Value;

use crate::Error;

/// `value` as canonical JSON bytes.
///
/// # Panics
///
/// If `value` cannot be represented as JSON at all (a map with non-string keys, or a `Serialize`
/// impl that fails). That is a bug in the caller's type, never a property of input data; use
/// [`try_to_canonical_json`] for types where it can happen.
pub fn to_canonical_json<T: Serialize + ?Sized>(value: &T) -> Vec<u8> {
    match try_to_canonical_json(value) {
        Ok(bytes) => bytes,
        Err(e) => panic!("to_canonical_json: value is not representable as JSON: {e}"),
    }
}

/// `value` as canonical JSON bytes, or why it cannot be written as JSON.
pub fn try_to_canonical_json<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, Error> {
    let value = serde_json::to_value(value).map_err(Error::Serialize)?;
    let mut out = Vec::new();
    write_canonical(&mut out, &value).map_err(Error::Serialize)?;
    Ok(out)
}

fn write_canonical(out: &mut Vec<u8>, v: &Value) -> Result<(), serde_json::Error> {
    match v {
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
            out.push(b'{');
            for (i, (k, v)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                serde_json::to_writer(&mut *out, k)?;
                out.push(b':');
                write_canonical(out, v)?;
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(out, item)?;
            }
            out.push(b']');
        }
        scalar => serde_json::to_writer(&mut *out, scalar)?,
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeMap, HashMap};

    #[derive(Serialize)]
    struct ZFirst {
        z: u32,
        a: Inner,
        m: Vec<Inner>,
    }

    #[derive(Serialize)]
    struct Inner {
        y: &'static str,
        b: Option<bool>,
    }

    #[derive(Serialize)]
    struct AFirst {
        a: Inner,
        m: Vec<Inner>,
        z: u32,
    }

    #[test]
    fn struct_field_order_does_not_leak() {
        let inner = || Inner {
            y: "é\"\n",
            b: None,
        };
        let z = ZFirst {
            z: 1,
            a: inner(),
            m: vec![inner(), inner()],
        };
        let a = AFirst {
            a: inner(),
            m: vec![inner(), inner()],
            z: 1,
        };
        let bytes = to_canonical_json(&z);
        assert_eq!(bytes, to_canonical_json(&a));
        assert_eq!(
            String::from_utf8(bytes).unwrap(),
            r#"{"a":{"b":null,"y":"é\"\n"},"m":[{"b":null,"y":"é\"\n"},{"b":null,"y":"é\"\n"}],"z":1}"#
        );
    }

    #[test]
    fn same_content_same_bytes_whatever_the_input_layout() {
        let one: Value =
            serde_json::from_str(r#"{ "b": [3, {"y": 1, "x": 2.5}], "a": {} }"#).unwrap();
        let two: Value =
            serde_json::from_str("{\"a\":{},\n\"b\":[3,{\"x\":2.5,\"y\":1}]}").unwrap();
        assert_eq!(to_canonical_json(&one), to_canonical_json(&two));
        assert_eq!(
            to_canonical_json(&one),
            br#"{"a":{},"b":[3,{"x":2.5,"y":1}]}"#
        );
        // Keys sort by bytes: uppercase before lowercase, shorter prefix first.
        let mut m = HashMap::new();
        for k in ["b", "B", "ba", "a", "_"] {
            m.insert(k, 0);
        }
        assert_eq!(
            to_canonical_json(&m),
            br#"{"B":0,"_":0,"a":0,"b":0,"ba":0}"#
        );
    }

    #[test]
    fn unrepresentable_values_are_errors() {
        let mut m = BTreeMap::new();
        m.insert(vec![1u8], 1);
        assert!(matches!(
            try_to_canonical_json(&m),
            Err(Error::Serialize(_))
        ));
    }
}
