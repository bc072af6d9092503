//! What the connector may do in the subscription: the caller's effective permissions
//! (Microsoft.Authorization/permissions) matched against the actions replication needs.

use serde_json::Value;

use crate::client::{Client, api};
use crate::error::Result;

/// The actions a replication needs: read VMs and disks, write and delete snapshots, and
/// begin and end read access to them (and to the disks snapshotted, which Azure checks as a
/// linked authorization when a snapshot is created).
pub const REPLICATION_ACTIONS: &[&str] = &[
    "Microsoft.Compute/virtualMachines/read",
    "Microsoft.Compute/disks/read",
    // Linked: a snapshot of a disk reads the disk, which needs access to it.
    "Microsoft.Compute/disks/beginGetAccess/action",
    "Microsoft.Compute/snapshots/read",
    "Microsoft.Compute/snapshots/write",
    "Microsoft.Compute/snapshots/delete",
    "Microsoft.Compute/snapshots/beginGetAccess/action",
    "Microsoft.Compute/snapshots/endGetAccess/action",
];

/// The subscription as Resource Manager shows it to us.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    /// Its id.
    pub id: String,
    /// Its display name.
    pub name: String,
    /// `Enabled`, `Disabled`, `Warned`…
    pub state: String,
}

impl Client {
    /// The configured subscription (an error if it is not visible to us).
    pub async fn subscription(&self) -> Result<Subscription> {
        let value = self
            .get_json(
                &self.subscription_path(),
                api::SUBSCRIPTIONS,
                "reading the subscription",
            )
            .await?;
        let text = |key: &str| {
            value
                .get(key)
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned()
        };
        Ok(Subscription {
            id: text("subscriptionId"),
            name: text("displayName"),
            state: text("state"),
        })
    }

    /// Which of `needed` the caller may not do in the subscription.
    pub async fn missing_permissions(&self, needed: &[&str]) -> Result<Vec<String>> {
        let path = format!(
            "{}/providers/Microsoft.Authorization/permissions",
            self.subscription_path()
        );
        let grants = self
            .list(&path, api::PERMISSIONS, "reading our permissions")
            .await?;
        Ok(missing(&grants, needed))
    }
}

/// The actions of `needed` no grant allows (an action is allowed by a grant when one of its
/// `actions` matches and none of its `notActions` does).
pub fn missing(grants: &[Value], needed: &[&str]) -> Vec<String> {
    let patterns = |grant: &Value, key: &str| -> Vec<String> {
        grant
            .get(key)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect()
    };
    needed
        .iter()
        .filter(|action| {
            !grants.iter().any(|grant| {
                patterns(grant, "actions")
                    .iter()
                    .any(|p| matches(p, action))
                    && !patterns(grant, "notActions")
                        .iter()
                        .any(|p| matches(p, action))
            })
        })
        .map(|a| (*a).to_owned())
        .collect()
}

/// Azure's action patterns: case-insensitive, `*` matching any run of characters.
pub fn matches(pattern: &str, action: &str) -> bool {
    let pattern = pattern.to_ascii_lowercase();
    let action = action.to_ascii_lowercase();
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or("");
    let Some(mut rest) = action.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    if parts.is_empty() {
        return rest.is_empty();
    }
    for (i, part) in parts.iter().enumerate() {
        if i == parts.len() - 1 {
            return rest.ends_with(part);
        }
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn patterns_match_like_azure() {
        assert!(matches("*", "Microsoft.Compute/disks/read"));
        assert!(matches(
            "Microsoft.Compute/*",
            "microsoft.compute/disks/read"
        ));
        assert!(matches("*/read", "Microsoft.Compute/disks/read"));
        assert!(matches(
            "Microsoft.Compute/*/read",
            "Microsoft.Compute/disks/read"
        ));
        assert!(!matches(
            "Microsoft.Compute/*/read",
            "Microsoft.Compute/snapshots/write"
        ));
        assert!(!matches(
            "Microsoft.Compute/disks/read",
            "Microsoft.Compute/disks/readx"
        ));
    }

    #[test]
    fn the_missing_actions_are_named() {
        let reader = json!({"actions": ["*/read"], "notActions": []});
        assert_eq!(
            missing(&[reader], REPLICATION_ACTIONS),
            [
                "Microsoft.Compute/disks/beginGetAccess/action",
                "Microsoft.Compute/snapshots/write",
                "Microsoft.Compute/snapshots/delete",
                "Microsoft.Compute/snapshots/beginGetAccess/action",
                "Microsoft.Compute/snapshots/endGetAccess/action",
            ]
        );
        let owner_but =
            json!({"actions": ["*"], "notActions": ["Microsoft.Compute/snapshots/delete"]});
        assert_eq!(
            missing(&[owner_but], REPLICATION_ACTIONS),
            ["Microsoft.Compute/snapshots/delete"]
        );
        assert!(missing(&[json!({"actions": ["*"]})], REPLICATION_ACTIONS).is_empty());
    }
}
