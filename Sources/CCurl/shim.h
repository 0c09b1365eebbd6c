#ifndef SHARDFS_CCURL_SHIM_H
#define SHARDFS_CCURL_SHIM_H
#include <curl/curl.h>
#endif
