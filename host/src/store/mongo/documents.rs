//! Records ⇄ BSON documents. Times are stored as BSON dates (sortable,
//! usable by TTL indexes); payloads as BSON values of their JSON.

use std::time::SystemTime;

use mongodb::bson::{Bson, DateTime, Document, doc};
use serde_json::value::RawValue;

use crate::protocol::rfc3339;
use crate::store::{ConnectionRecord, NotificationRecord};

/// A BSON date from an RFC 3339 timestamp of ours (now if unparsable).
pub fn date(rfc3339_text: &str) -> DateTime {
    DateTime::parse_rfc3339_str(rfc3339_text)
        .unwrap_or_else(|_| DateTime::from_system_time(SystemTime::now()))
}

fn json_to_bson(json: &RawValue) -> Bson {
    serde_json::from_str(json.get()).unwrap_or_else(|_| Bson::String(json.get().to_owned()))
}

fn optional(text: Option<&String>) -> Bson {
    text.map_or(Bson::Null, |text| Bson::String(text.clone()))
}

/// A `userConnections` document.
pub fn connection(record: &ConnectionRecord, instance_id: &str) -> Document {
    let details = serde_json::to_string(&record.details)
        .ok()
        .and_then(|text| serde_json::from_str::<Document>(&text).ok())
        .unwrap_or_default();
    doc! {
        "_id": &record.id,
        "userId": &record.user_id,
        "role": &record.role,
        "instanceId": instance_id,
        "connectedAt": date(&record.connected_at),
        "lastSeenAt": date(&record.last_seen_at),
        "details": details,
        "remoteAddr": optional(record.remote_addr.as_ref()),
        "userAgent": optional(record.user_agent.as_ref()),
    }
}

/// A `notificationLogs` document.
pub fn notification(record: &NotificationRecord) -> Document {
    doc! {
        "_id": &record.id,
        "eventId": &record.event_id,
        "event": &record.event,
        "trigger": &record.trigger,
        "source": &record.source,
        "from": &record.from,
        "to": &record.to,
        "plugin": &record.plugin,
        "data": json_to_bson(&record.data),
        "connections": i64::from(record.connections),
        "createdAt": date(&record.created_at),
        "seq": record.seq,
    }
}

/// A record from a `notificationLogs` document; `None` if it is not one.
pub fn notification_record(document: &Document) -> Option<NotificationRecord> {
    let text = |field: &str| document.get_str(field).ok().map(str::to_owned);
    let data = document
        .get("data")
        .cloned()
        .unwrap_or(Bson::Null)
        .into_relaxed_extjson();
    Some(NotificationRecord {
        id: text("_id")?,
        event_id: text("eventId")?,
        event: text("event")?,
        trigger: text("trigger")?,
        source: text("source")?,
        from: text("from")?,
        to: text("to")?,
        plugin: text("plugin")?,
        data: serde_json::value::to_raw_value(&data).ok()?,
        connections: match document.get("connections") {
            Some(Bson::Int64(n)) => u32::try_from(*n).unwrap_or(u32::MAX),
            Some(Bson::Int32(n)) => u32::try_from(*n).unwrap_or(0),
            _ => 0,
        },
        created_at: rfc3339(document.get_datetime("createdAt").ok()?.to_system_time()),
        seq: document.get_i64("seq").unwrap_or(0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_notification_survives_the_round_trip() {
        let record = NotificationRecord {
            id: "d1:u1".into(),
            event_id: "e1".into(),
            event: "message".into(),
            trigger: "sendMessage".into(),
            source: "client".into(),
            from: "s_1".into(),
            to: "u1".into(),
            plugin: "chat@0.1.0".into(),
            data: RawValue::from_string(r#"{"text":"hé","n":3,"list":[1,2.5,null]}"#.into())
                .unwrap(),
            connections: 2,
            created_at: "2026-11-26T10:00:00.123Z".into(),
            seq: 7,
        };
        let back = notification_record(&notification(&record)).unwrap();
        assert_eq!(back.id, record.id);
        assert_eq!(back.created_at, record.created_at);
        assert_eq!(back.connections, 2);
        assert_eq!(back.seq, 7);
        let data: serde_json::Value = serde_json::from_str(back.data.get()).unwrap();
        assert_eq!(
            data,
            serde_json::json!({"text":"hé","n":3,"list":[1,2.5,null]})
        );
    }
}
