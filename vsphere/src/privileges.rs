//! Which privileges the logged-in user lacks, for `rehost config check`.
//!
//! Asked with `FetchUserPrivilegeOnEntities` on the inventory root: the connector's role
//! is granted there (propagating to every VM and datastore), as the SMS connector's was.

use std::collections::HashSet;

use crate::client::Client;
use crate::error::Result;
use crate::soap::Request;

impl Client {
    /// The privileges of `required` that the logged-in user does not hold on the
    /// inventory root, in the order given.
    pub async fn missing_privileges(&self, required: &[&str]) -> Result<Vec<String>> {
        let manager = self.service_content_ref("authorizationManager").await?;
        let method = "FetchUserPrivilegeOnEntities";
        let mut req = Request::new(method, &manager);
        req.moref("entities", &self.service_content().root_folder)
            .text("userName", self.username());
        let response = self.call(&req).await?;
        let granted: HashSet<&str> = response
            .children_named("returnval")
            .flat_map(|result| result.children_named("privileges"))
            .map(|p| p.trimmed())
            .collect();
        Ok(required
            .iter()
            .filter(|p| !granted.contains(**p))
            .map(|p| (*p).to_owned())
            .collect())
    }
}
