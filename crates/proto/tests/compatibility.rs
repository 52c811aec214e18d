//! The breaking-change guard: the descriptors compiled now must keep every message, field (number,
//! type, label), enum value, service and method (types, streaming) of the last released descriptors
//! in `proto/released/kiln-v1.binpb`. Adding is free; removing, renumbering or retyping fails here.
//! After a release, refresh the snapshot with `KILN_BLESS_PROTO=1 cargo test -p kiln-proto --test
//! compatibility`.

use std::collections::HashMap;
use std::path::PathBuf;

use prost::Message;
use prost_types::{DescriptorProto, FileDescriptorSet};

fn released_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../proto/released/kiln-v1.binpb")
}

fn messages(set: &FileDescriptorSet) -> HashMap<String, &DescriptorProto> {
    fn walk<'a>(
        prefix: &str,
        m: &'a DescriptorProto,
        out: &mut HashMap<String, &'a DescriptorProto>,
    ) {
        let name = format!("{prefix}.{}", m.name());
        for nested in &m.nested_type {
            walk(&name, nested, out);
        }
        out.insert(name, m);
    }
    let mut out = HashMap::new();
    for file in &set.file {
        for m in &file.message_type {
            walk(&format!(".{}", file.package()), m, &mut out);
        }
    }
    out
}

/// Every incompatibility of `current` with `released`.
fn breaking_changes(released: &FileDescriptorSet, current: &FileDescriptorSet) -> Vec<String> {
    let mut problems = Vec::new();
    let now = messages(current);
    for (name, old) in messages(released) {
        let Some(new) = now.get(&name) else {
            problems.push(format!("message {name} was removed"));
            continue;
        };
        for field in &old.field {
            match new.field.iter().find(|f| f.number() == field.number()) {
                None => problems.push(format!(
                    "{name}.{} (field {}) was removed",
                    field.name(),
                    field.number()
                )),
                Some(f) => {
                    if f.r#type() != field.r#type() || f.type_name() != field.type_name() {
                        problems.push(format!("{name}.{} changed type", field.name()));
                    }
                    if f.label() != field.label() {
                        problems.push(format!("{name}.{} changed label", field.name()));
                    }
                    if f.oneof_index.is_some() != field.oneof_index.is_some() {
                        problems.push(format!(
                            "{name}.{} moved in or out of a oneof",
                            field.name()
                        ));
                    }
                }
            }
        }
    }
    let enums = |set: &FileDescriptorSet| {
        set.file
            .iter()
            .flat_map(|f| {
                f.enum_type
                    .iter()
                    .map(move |e| (format!(".{}.{}", f.package(), e.name()), e.clone()))
            })
            .collect::<HashMap<_, _>>()
    };
    let now_enums = enums(current);
    for (name, old) in enums(released) {
        let Some(new) = now_enums.get(&name) else {
            problems.push(format!("enum {name} was removed"));
            continue;
        };
        for v in &old.value {
            if !new.value.iter().any(|n| n.number() == v.number()) {
                problems.push(format!(
                    "{name}.{} (value {}) was removed",
                    v.name(),
                    v.number()
                ));
            }
        }
    }
    let services = |set: &FileDescriptorSet| {
        set.file
            .iter()
            .flat_map(|f| {
                f.service
                    .iter()
                    .map(move |s| (format!("{}.{}", f.package(), s.name()), s.clone()))
            })
            .collect::<HashMap<_, _>>()
    };
    let now_services = services(current);
    for (name, old) in services(released) {
        let Some(new) = now_services.get(&name) else {
            problems.push(format!("service {name} was removed"));
            continue;
        };
        for m in &old.method {
            match new.method.iter().find(|n| n.name() == m.name()) {
                None => problems.push(format!("rpc {name}.{} was removed", m.name())),
                Some(n) => {
                    if n.input_type() != m.input_type()
                        || n.output_type() != m.output_type()
                        || n.client_streaming() != m.client_streaming()
                        || n.server_streaming() != m.server_streaming()
                    {
                        problems.push(format!("rpc {name}.{} changed its signature", m.name()));
                    }
                }
            }
        }
    }
    problems.sort();
    problems
}

fn current() -> FileDescriptorSet {
    FileDescriptorSet::decode(kiln_proto::FILE_DESCRIPTOR_SET).expect("compiled descriptors decode")
}

#[test]
fn the_protocol_keeps_everything_it_released() {
    let path = released_path();
    if std::env::var_os("KILN_BLESS_PROTO").is_some() {
        std::fs::write(&path, kiln_proto::FILE_DESCRIPTOR_SET).expect("writing the snapshot");
    }
    let bytes = std::fs::read(&path).expect("proto/released/kiln-v1.binpb exists");
    let released = FileDescriptorSet::decode(bytes.as_slice()).expect("snapshot decodes");
    let problems = breaking_changes(&released, &current());
    assert!(
        problems.is_empty(),
        "breaking changes to the protocol:\n{}",
        problems.join("\n")
    );
}

#[test]
fn the_guard_catches_removals_renumbering_and_retyping() {
    let released = current();
    let mut changed = released.clone();
    let image = changed
        .file
        .iter_mut()
        .find(|f| f.name().ends_with("image.proto"))
        .expect("image.proto");
    let request = image
        .message_type
        .iter_mut()
        .find(|m| m.name() == "GenerateRequest")
        .expect("GenerateRequest");
    request.field.retain(|f| f.name() != "width");
    let prompt = request
        .field
        .iter_mut()
        .find(|f| f.name() == "prompt")
        .unwrap();
    prompt.set_type(prost_types::field_descriptor_proto::Type::Bytes);
    image.service[0].method.retain(|m| m.name() != "GetQuota");
    let problems = breaking_changes(&released, &changed);
    assert_eq!(problems.len(), 3, "{problems:?}");
    assert!(problems.iter().any(|p| p.contains("GenerateRequest.width")));
    assert!(problems.iter().any(|p| p.contains("prompt changed type")));
    assert!(problems.iter().any(|p| p.contains("GetQuota was removed")));
    // Additions are compatible.
    let mut added = released.clone();
    let image = added
        .file
        .iter_mut()
        .find(|f| f.name().ends_with("image.proto"))
        .unwrap();
    let request = image
        .message_type
        .iter_mut()
        .find(|m| m.name() == "GenerateRequest")
        .unwrap();
    let mut extra = request.field[0].clone();
    extra.name = Some("new_field".into());
    extra.number = Some(99);
    request.field.push(extra);
    assert!(breaking_changes(&released, &added).is_empty());
}
