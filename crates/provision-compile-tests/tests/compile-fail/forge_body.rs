// A handler that builds the 201 body by hand.
use keel_provision::ProvisionedBody;

fn handler() -> ProvisionedBody {
    ProvisionedBody {
        ok: true,
        id: String::new(),
        team_id: String::new(),
        resource_type: "postgres",
        tier: String::from("pro"),
        status: "active",
        connection_url: String::new(),
        request_id: String::new(),
    }
}

fn main() {}
