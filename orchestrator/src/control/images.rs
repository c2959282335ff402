//! What nodes hear about images: a ready image gets a spare system disk
//! prepared, a deleted one loses it.

use crate::keel::Keel;

pub fn ready(keel: &Keel, image: &str) {
    keel.agent.image_ready(image);
}

pub fn removed(keel: &Keel, image: &str) {
    keel.agent.image_removed(image);
}
