//! Quadrants and the security identities the datapath classifies addresses into.
//!
//! An identity is one byte in every map key: the four quadrants, the host itself, and "world"
//! (anything no prefix in the LPM trie names).

/// Number of quadrants a node runs.
pub const QUADRANT_COUNT: usize = 4;

/// [`QUADRANT_COUNT`] as the `u32` map indices use.
pub const QUADRANT_COUNT_U32: u32 = 4;

const _: () = assert!(QUADRANT_COUNT as u64 == QUADRANT_COUNT_U32 as u64);

/// Number of identities (quadrants + host + world).
pub const IDENTITY_COUNT: usize = 6;

/// One of the four isolated quadrants.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Quadrant {
    /// Development.
    Dx = 0,
    /// Development gateway.
    Dg = 1,
    /// Production.
    Px = 2,
    /// Production gateway.
    Pg = 3,
}

impl Quadrant {
    /// All quadrants in id order.
    pub const ALL: [Self; QUADRANT_COUNT] = [Self::Dx, Self::Dg, Self::Px, Self::Pg];

    /// Lower-case short name used in configuration, interface and namespace names.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Dx => "dx",
            Self::Dg => "dg",
            Self::Px => "px",
            Self::Pg => "pg",
        }
    }

    /// The quadrant with this id, if any.
    #[must_use]
    pub const fn from_id(id: u8) -> Option<Self> {
        match id {
            0 => Some(Self::Dx),
            1 => Some(Self::Dg),
            2 => Some(Self::Px),
            3 => Some(Self::Pg),
            _ => None,
        }
    }

    /// Parses a short name (`dx`, `DX`, …).
    #[must_use]
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|q| q.name().eq_ignore_ascii_case(name))
    }

    /// Whether the quadrant belongs to production (PX, PG) rather than development (DX, DG).
    #[must_use]
    pub const fn is_production(self) -> bool {
        matches!(self, Self::Px | Self::Pg)
    }
}

/// A security identity as stored in map keys and values.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Identity {
    /// Development quadrant.
    Dx = 0,
    /// Development gateway quadrant.
    Dg = 1,
    /// Production quadrant.
    Px = 2,
    /// Production gateway quadrant.
    Pg = 3,
    /// The node itself (its quadrant gateway addresses and any configured host address).
    Host = 4,
    /// Any address no prefix names.
    World = 5,
}

impl Identity {
    /// All identities in id order.
    pub const ALL: [Self; IDENTITY_COUNT] = [
        Self::Dx,
        Self::Dg,
        Self::Px,
        Self::Pg,
        Self::Host,
        Self::World,
    ];

    /// Lower-case name used in configuration and status output.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Dx => "dx",
            Self::Dg => "dg",
            Self::Px => "px",
            Self::Pg => "pg",
            Self::Host => "host",
            Self::World => "world",
        }
    }

    /// The identity with this id, if any.
    #[must_use]
    pub const fn from_id(id: u8) -> Option<Self> {
        match id {
            0 => Some(Self::Dx),
            1 => Some(Self::Dg),
            2 => Some(Self::Px),
            3 => Some(Self::Pg),
            4 => Some(Self::Host),
            5 => Some(Self::World),
            _ => None,
        }
    }

    /// Parses a name (`dx`, `host`, `world`, case-insensitive).
    #[must_use]
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|i| i.name().eq_ignore_ascii_case(name))
    }
}

impl From<Quadrant> for Identity {
    fn from(q: Quadrant) -> Self {
        match q {
            Quadrant::Dx => Self::Dx,
            Quadrant::Dg => Self::Dg,
            Quadrant::Px => Self::Px,
            Quadrant::Pg => Self::Pg,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip() {
        for q in Quadrant::ALL {
            assert_eq!(Quadrant::from_id(q as u8), Some(q));
            assert_eq!(Quadrant::from_name(&q.name().to_ascii_uppercase()), Some(q));
            assert_eq!(Identity::from(q) as u8, q as u8);
        }
        for i in Identity::ALL {
            assert_eq!(Identity::from_id(i as u8), Some(i));
            assert_eq!(Identity::from_name(i.name()), Some(i));
        }
        assert_eq!(Quadrant::from_id(4), None);
        assert_eq!(Identity::from_id(6), None);
        assert_eq!(Identity::from_name("prod"), None);
    }

    #[test]
    fn production_split() {
        assert!(!Quadrant::Dx.is_production());
        assert!(!Quadrant::Dg.is_production());
        assert!(Quadrant::Px.is_production());
        assert!(Quadrant::Pg.is_production());
    }
}
